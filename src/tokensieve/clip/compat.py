"""Importing open_clip where torchvision's compiled operators cannot load.

PyPI only has CUDA builds of torchvision; next to the project's CPU build of torch their
``_C`` extension fails to load (it links ``libtorch_cuda.so``). torchvision tolerates that
(``torchvision.extension._has_ops()`` becomes False) except that ``_meta_registrations``
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally,
which raises "operator torchvision::nms does not exist" and makes ``import torchvision`` (and
so ``import open_clip`` and clip_benchmark) fail. Neither library uses those detection ops.

:func:`import_open_clip` first tries to load the extension exactly as torchvision would; only
if that fails does it declare the two operator schemas (no kernels), so the import succeeds
and calling ``nms`` would still fail loudly. With a matching torch/torchvision pair (e.g. a
CUDA torch) nothing is declared.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
_library: torch.library.Library | None = None  # kept alive: dropping it would undefine the schemas


def _torchvision_extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to shim, the import error will say so
    folder = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_C{suffix}"
        if path.is_file():
            try:
                torch.ops.load_library(str(path))
                return True
            except OSError:
                return False
    return False


def ensure_torchvision_importable() -> None:
    """Declare torchvision's two detection-op schemas if its compiled extension cannot load."""
    global _library
    if "torchvision" in sys.modules or _library is not None or _torchvision_extension_loads():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


def import_open_clip() -> ModuleType:
    """``open_clip``, importable on a CPU-only torch (see the module docstring)."""
    ensure_torchvision_importable()
    import open_clip

    return open_clip
