"""Pure tensor functions shared by backbones and methods (no model knowledge here)."""

from __future__ import annotations

import torch
from torch import nn


def query_attention(hidden: torch.Tensor, q_proj: nn.Linear, k_proj: nn.Linear, num_heads: int,
                    query_index: int = 0, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of one query position over all keys, averaged over heads.

    Recomputed from the layer's own projections so fused (SDPA) attention can stay on.
    hidden: ``(B, T, d)`` the states the attention layer receives (already normalised).
    Returns ``(B, T)``; each row sums to 1.
    """
    b, t, _ = hidden.shape
    q = q_proj(hidden[:, query_index : query_index + 1]).view(b, 1, num_heads, -1).transpose(1, 2)
    k = k_proj(hidden).view(b, t, num_heads, -1).transpose(1, 2)  # (B, H, T, dh)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * scale  # (B, H, T)
    return scores.softmax(-1).mean(1)
