"""Llama decoder math the pruning sessions need, as pure functions: attention rows recomputed
from a layer's own q/k (so fused attention stays on), keys after RoPE, and the additive masks
that remove a token as an attention key. Families whose decoders are Llama's reuse it."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def most_negative(dtype: torch.dtype) -> float:
    """The most negative finite value of ``dtype``: an additive mask entry that removes a key."""
    return torch.finfo(dtype).min


def log_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias ``log(mask)``, finite (a fully masked row must not produce NaN)."""
    return mask.to(dtype).log().clamp(min=most_negative(dtype))


# A differentiable key mask m becomes the bias log(floor + (1 - floor) m): a dropped token keeps
# a 1e-6 share of its weight, so the gradient reaching m is the attention it would have had
# (log(0) would give none), while the forward pass stays within 1e-6 of removing it.
SOFT_MASK_FLOOR = 1e-6


def soft_key_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias of a differentiable keep mask ``(B, K)`` in [0, 1]."""
    return (SOFT_MASK_FLOOR + (1 - SOFT_MASK_FLOOR) * key_mask.to(dtype)).log()


def as_additive(mask: torch.Tensor | None, batch: int, q: int, k: int, dtype, device) -> torch.Tensor:
    """A 4D additive float mask ``(B, 1, q, k)`` from None (causal), bool or float masks."""
    if mask is None:
        allowed = torch.ones(q, k, dtype=torch.bool, device=device).tril(k - q)
        return torch.where(allowed, 0.0, most_negative(dtype)).to(dtype).expand(batch, 1, q, k).clone()
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, most_negative(dtype)).to(dtype)
    return mask.to(dtype)


def last_queries_attention(attn, hidden: torch.Tensor, keys: torch.Tensor, kwargs: dict,
                           queries: int = 1) -> torch.Tensor:
    """``(B, queries, T)``: the attention of the last ``queries`` positions over all positions in a
    Llama attention layer, mean over heads, recomputed from the layer's own q/k so fused attention
    stays on.

    hidden: ``(B, T, d)`` the layer's normalised input; keys: ``(B, T, H_kv * d_head)`` its k_proj
    output; kwargs: the layer's ``position_embeddings`` (RoPE tables) and ``attention_mask``.
    The softmax runs in float32 and is cast back, as the papers' code does in half precision.
    """
    cos, sin = kwargs["position_embeddings"]
    b, t, _ = hidden.shape
    q = attn.q_proj(hidden[:, t - queries:]).view(b, queries, -1, attn.head_dim).transpose(1, 2)
    k = keys.view(b, t, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, t - queries:], sin[:, t - queries:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, H, queries, T)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        scores = scores + as_additive(mask, b, t, t, scores.dtype, scores.device)[:, :, t - queries:]
    elif queries > 1:  # no mask given: causal
        scores = scores + as_additive(None, b, queries, t, scores.dtype, scores.device)
    return scores.float().softmax(-1).to(hidden.dtype).mean(1)


def last_query_attention(attn, hidden: torch.Tensor, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(B, T)``: the last position's attention over all positions (:func:`last_queries_attention`)."""
    return last_queries_attention(attn, hidden, keys, kwargs)[:, 0]


def rotated_keys(attn, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(B, T, H_kv * d_head)``: a layer's keys ``(B, T, H_kv * d_head)`` (its k_proj output) after
    RoPE, heads side by side per position, as DART's released code reads them."""
    cos, sin = kwargs["position_embeddings"]
    b, t, _ = keys.shape
    k = keys.view(b, t, -1, attn.head_dim).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.transpose(1, 2).reshape(b, t, -1)
