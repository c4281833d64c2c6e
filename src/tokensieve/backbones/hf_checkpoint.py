"""Reading a transformers checkpoint (a local folder or a hub id) safely and completely.

Model-agnostic: an adapter checks the config's ``model_type`` (:func:`checkpoint_config`), then
reads the weights with :func:`load_complete`. Weights are read as safetensors, or ``.bin`` files
by ``torch.load(weights_only=True)`` (transformers' own choice), so a checkpoint cannot run code;
one that lacks any of the model's weights is refused rather than completed with random ones.
Every failure is one line (a :class:`TokensieveError`). :func:`model_and_processor` then puts the
model on its device with the checkpoint's processor.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from tokensieve.errors import TokensieveError
from tokensieve.held_warnings import warnings_held_until_success


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def checkpoint_config(name_or_path: str):
    """The ``PretrainedConfig`` of checkpoint ``name_or_path``, read before any weight is."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise TokensieveError(f"{name_or_path} is not a model checkpoint folder: it has no config.json")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        if HFValidationError in (type(err), type(err.__cause__)):  # a name no repo id can have: /abs/path, a/b/c
            raise TokensieveError(f"cannot load model {name_or_path!r}: there is no such folder") from None
        local = "" if path.exists() else "no such folder, and as a hub id: "
        raise TokensieveError(f"cannot load model {name_or_path!r}: {local}{first_line(err)}") from None


def _load_weights(model_class: type, name: str, dtype: torch.dtype | None) -> tuple:
    """The model and transformers' loading info; a load that fails is one line, with neither
    transformers' load report nor torch's warnings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report: its findings are checked by the caller
    try:
        with warnings_held_until_success():
            loaded = model_class.from_pretrained(name, dtype=dtype, output_loading_info=True)
    except (pickle.UnpicklingError, EOFError):
        raise TokensieveError(f"cannot load the weights of {name!r}: its .bin weights are not a plain file of "
                              "tensors (empty, corrupt, or holding pickled objects, which "
                              "torch.load(weights_only=True) refuses to run)") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise TokensieveError(f"cannot load the weights of {name!r}: {first_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return loaded


def load_complete(model_class: type, name: str, dtype: torch.dtype | None):
    """The ``model_class`` model of checkpoint ``name``, every weight from the checkpoint;
    tensors it holds that the model does not use are warned about.

    Called as ``Backbone.from_pretrained -> load_<family>_weights -> load_complete``: the
    warning names the caller of ``from_pretrained`` (stacklevel 4)."""
    model, loaded = _load_weights(model_class, name, dtype)
    missing = sorted(loaded["missing_keys"])
    if missing:
        raise TokensieveError(f"cannot load the weights of {name!r}: {len(missing)} of the model's weights are "
                              f"not in its checkpoint, e.g. {missing[0]}")
    if loaded["unexpected_keys"]:
        warnings.warn(f"{name}: {len(loaded['unexpected_keys'])} tensors of its checkpoint are not used by "
                      f"the model, e.g. {min(loaded['unexpected_keys'])}", stacklevel=4)
    return model


def model_and_processor(model, name: str, device: str | torch.device, image_processor_apart: bool = False) -> tuple:
    """``(model, processor)`` for an adapter's ``from_pretrained``: the model on ``device`` in eval mode,
    and checkpoint ``name``'s processor with the PIL image processor (the image processing LLaVA and
    the testbed were trained with, and the same with or without torchvision installed: transformers
    would otherwise switch backends), or None where the checkpoint ships weights only (callers that
    need one say so). image_processor_apart: load the processor as the checkpoint gives it, then
    replace its image processor by the PIL one (Qwen-VL: its processor also holds a video processor,
    which has no PIL backend, so ``backend="pil"`` on the whole processor fails to load it)."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        if image_processor_apart:
            processor = AutoProcessor.from_pretrained(name)
            processor.image_processor = AutoImageProcessor.from_pretrained(name, backend="pil")
        else:
            processor = AutoProcessor.from_pretrained(name, backend="pil")
    except (OSError, ValueError):
        processor = None
    return model.to(device).eval(), processor
