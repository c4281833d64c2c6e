"""Attention rows recomputed from a layer's own query and key projections, so the model's fused
attention stays on: the one implementation of CLS attention (a vision block's CLS row over its
tokens) every session and recorder reads.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, T, H * d_h)`` projections -> ``(B, H, T, d_h)``, one slice per head."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def head_mean_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                        key_bias: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """``(B, Q, T)``: the softmax attention of ``Q`` queries over ``T`` keys, mean over heads.

    queries: ``(B, H, Q, d_h)``; keys: ``(B, H, T, d_h)``; scale: the layer's logit scale.
    key_bias: optional ``(B, T)`` additive bias on the keys (a soft mask's ``log(mask)``).
    upcast: softmax in float32 (the result stays float32); otherwise in the inputs' dtype.
    """
    scores = (queries @ keys.transpose(-1, -2)) * scale  # (B, H, Q, T)
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    return (scores.float() if upcast else scores).softmax(-1).mean(1)


def cls_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                  key_bias: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """``(B, T)``: the CLS row's attention over all ``T`` tokens (CLS included, at 0), mean over heads.

    queries: ``(B, H, 1, d_h)`` the CLS query; keys: ``(B, H, T, d_h)``; the rest as
    :func:`head_mean_attention`. Read ``[:, 1:]`` for the patches.
    """
    return head_mean_attention(queries, keys, scale, key_bias, upcast)[:, 0]


def layer_cls_attention(hidden: torch.Tensor, q_proj, keys: torch.Tensor, heads: int, scale: float,
                        key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T)``: :func:`cls_attention` of an attention layer from its input and its keys.

    hidden: ``(B, T, d)`` the layer's normalised input, CLS at 0; q_proj: its query projection;
    keys: ``(B, T, H * d_h)`` its key projection's output (as the layer computed it); heads: ``H``
    (1 reads the full width as one head).
    """
    return cls_attention(split_heads(q_proj(hidden[:, :1]), heads), split_heads(keys, heads), scale, key_bias)
