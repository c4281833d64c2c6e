"""The libraries of tokensieve's integrations: optional extras, imported on first use.

A base install (``pip install tokensieve``) runs the demo, training, evaluation and the speed
benchmark. Each integration imports its library through :func:`require`, so a missing one is
one line naming the extra that brings it (the CLI prints it and exits 2) instead of a
traceback; ``import tokensieve`` imports none of them.

torchvision next to a CPU-only torch
------------------------------------
PyPI only has CUDA builds of torchvision; next to the project's CPU build of torch their
``_C`` extension fails to load (it links ``libtorch_cuda.so``). torchvision tolerates that
(``torchvision.extension._has_ops()`` becomes False) except that ``_meta_registrations``
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally,
which raises "operator torchvision::nms does not exist" and makes ``import torchvision`` fail.
Neither open_clip nor clip_benchmark uses those detection ops.

:func:`ensure_torchvision_importable` first tries to load the extension exactly as torchvision
would; only if that fails does it declare the two operator schemas (no kernels), so the import
succeeds and calling ``nms`` would still fail loudly. With a matching torch/torchvision pair
(e.g. a CUDA torch) nothing is declared.

It must run before the first ``import torchvision``, and that is not only open_clip's:
transformers 5.x imports torchvision whenever it is installed, from ``transformers.image_utils``,
which ``modeling_utils`` (every model) and ``configuration_llama`` import. So every LLaVA path
would need it, from a dozen tokensieve modules and from user code. ``import tokensieve`` therefore
only installs :class:`_BeforeTorchvision`, which applies it at the moment anything first looks
torchvision up; without torchvision (a base install) the registry is never touched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from tokensieve.errors import TokensieveError

# extra -> (what needs it, {import name: distribution}) for every library the extra brings.
EXTRAS = {
    "clip": ("CLIP ViT pruning", {"open_clip": "open-clip-torch", "clip_benchmark": "clip-benchmark",
                                  "torchvision": "torchvision", "webdataset": "webdataset", "ftfy": "ftfy",
                                  "requests": "requests"}),
    "search": ("tokensieve search", {"optuna": "optuna", "sqlalchemy": "optuna"}),
    "lmms": ("the tokensieve lmms-eval model", {"lmms_eval": "lmms-eval"}),
    "dist": ("a run in several processes", {"accelerate": "accelerate"}),
}  # tensorboard (extra "tensorboard") is optional even for the trainer: see summary_writer


def require(name: str, extra: str) -> ModuleType:
    """The module ``name`` (e.g. ``"optuna"``, ``"clip_benchmark.cli"``), or a one-line
    :class:`TokensieveError` naming ``extra`` when the extra's libraries are not installed.

    A module missing outside the extra (a broken install) raises as it is."""
    use, libraries = EXTRAS[extra]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing not in libraries:
            raise
        raise TokensieveError(f"{use} needs {libraries[missing]}: pip install 'tokensieve[{extra}]'") from None


class _NoEvents:
    """What the trainer writes TensorBoard events with when tensorboard is not installed: nothing."""

    def __init__(self, *_args, **_kwargs):
        pass

    def add_scalar(self, *_args, **_kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def summary_writer() -> type:
    """torch's ``SummaryWriter`` with ``tokensieve[tensorboard]`` installed, else a writer of nothing
    (the training log ``log.jsonl`` holds the same numbers)."""
    if importlib.util.find_spec("tensorboard") is None:
        return _NoEvents
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def import_open_clip() -> ModuleType:
    """``open_clip``, importable on a CPU-only torch (see the module docstring)."""
    ensure_torchvision_importable()
    return require("open_clip", "clip")


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


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision_importable` when torchvision is first looked up (by an
    import or by ``importlib.util.find_spec``, as transformers checks it); finds nothing itself.
    It stays in ``sys.meta_path`` (removing it there would skip the next finder of the lookup
    in progress) and does nothing after the first time."""

    done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not self.done:
            self.done = True  # first: the check below looks torchvision up itself
            ensure_torchvision_importable()
        return None  # the ordinary finders import it


def shim_torchvision_when_imported() -> None:
    """Have :func:`ensure_torchvision_importable` run just before torchvision's first import."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
