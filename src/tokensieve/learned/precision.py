"""The learned parts keep float32 weights (stable AdamW updates) on a backbone that may run in
bfloat16 or float16: each part computes in its own dtype and hands tokens back in the caller's."""

from __future__ import annotations

import torch
from torch import nn


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s parameters (what its inputs are cast to)."""
    return next(module.parameters()).dtype


def cast_like(module: nn.Module, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` in ``module``'s weight dtype (None stays None)."""
    return None if tensor is None else tensor.to(weight_dtype(module))
