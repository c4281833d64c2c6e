"""Reading a LLaVA checkpoint (a local folder or a hub id) safely and completely.

The checkpoint is checked to be a LLaVA one before any weight is read, then read by
:func:`tokensieve.backbones.hf_checkpoint.load_complete` (no code run, no weight missing).
Every failure is one line (a :class:`TokensieveError`).
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from tokensieve.backbones.hf_checkpoint import checkpoint_config, load_complete
from tokensieve.errors import TokensieveError


def load_llava_weights(name: str, dtype: torch.dtype | None) -> LlavaForConditionalGeneration:
    """The LLaVA model of checkpoint ``name`` (a folder or a hub id), every weight from the
    checkpoint; tensors it holds that the model does not use are warned about."""
    config = checkpoint_config(name)
    if config.model_type != "llava":
        raise TokensieveError(
            f"{name} is a {config.model_type!r} model; the LLaVA backbone needs model_type "
            "'llava' (LlavaForConditionalGeneration)")
    return load_complete(LlavaForConditionalGeneration, name, dtype)
