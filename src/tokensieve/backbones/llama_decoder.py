"""Llama decoder math the pruning sessions need, as pure functions: attention rows recomputed
from a layer's own q/k (so fused attention stays on), keys after RoPE, the additive masks that
remove a token as an attention key, and what a decoder layer receives once tokens are removed
before it (:class:`Drop`, :func:`drop_before`, :func:`layer_kwargs`: RoPE ``cos``/``sin`` tables,
``position_ids`` and the 4D mask gathered to the kept columns, positions renumbered, and the
mask's key axis remapped to the shorter KV cache while decoding). Families whose decoders are
Llama's (1D positions, RoPE tables passed to every layer as ``position_embeddings``) reuse it;
so do Qwen-VL's, whose tables arrive already combined from their 3-D ids and whose Qwen3 heads
are normalised (``q_norm``/``k_norm``) before RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tokensieve.errors import TokensieveError


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


def _head_norm(attn, name: str, heads: torch.Tensor) -> torch.Tensor:
    """``heads`` ``(B, T, H, d_head)`` through the layer's per-head norm ``name`` before RoPE, where it
    has one (Qwen3's ``q_norm``/``k_norm``); unchanged otherwise (Llama, Qwen2/2.5)."""
    norm = getattr(attn, name, None)
    return heads if norm is None else norm(heads)


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
    q = _head_norm(attn, "q_norm", attn.q_proj(hidden[:, t - queries:]).view(b, queries, -1, attn.head_dim))
    k = _head_norm(attn, "k_norm", keys.view(b, t, -1, attn.head_dim))
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, t - queries:], sin[:, t - queries:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, H, queries, T)
    mask = kwargs.get("attention_mask")
    if mask is not None:  # only the last rows, made additive: not a (B, 1, T, T) float mask for one query
        scores = scores + as_additive(mask[:, :, t - queries:], b, queries, t, scores.dtype, scores.device)
    elif queries > 1:  # no mask given: causal
        scores = scores + as_additive(None, b, queries, t, scores.dtype, scores.device)
    return scores.float().softmax(-1).to(hidden.dtype).mean(1)


def last_query_attention(attn, hidden: torch.Tensor, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(B, T)``: the last position's attention over all positions (:func:`last_queries_attention`)."""
    return last_queries_attention(attn, hidden, keys, kwargs)[:, 0]


def own_last_query_attention(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(B, L)``: the last position's attention at decoder ``layer`` itself, from its own norm and q/k on
    the states ``hidden`` ``(B, L, d)`` entering it; kwargs: its attention's, as adjusted for the columns
    still there (positions and mask of earlier drops)."""
    normed = layer.input_layernorm(hidden)
    return last_query_attention(layer.self_attn, normed, layer.self_attn.k_proj(normed), kwargs)


def positions_still_there(kwargs: dict, b: int, drops: list, adapter: str) -> torch.Tensor:
    """``(B, L)``: the 1-D position id of every column still in the sequence (``drops``: the
    :class:`Drop` s so far), from the ``position_ids`` the layer received (refused in one line, naming
    ``adapter``'s forward, when it received none)."""
    positions = kwargs.get("position_ids")
    if positions is None:
        raise TokensieveError(f"the LLM's layers received no position_ids: run the model through {adapter}.forward "
                              "or .generate")
    positions = positions.expand(b, -1)
    return positions.gather(1, drops[-1].positions) if drops else positions


def rotated_keys(attn, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(B, T, H_kv * d_head)``: a layer's keys ``(B, T, H_kv * d_head)`` (its k_proj output) after
    RoPE, heads side by side per position, as DART's released code reads them."""
    cos, sin = kwargs["position_embeddings"]
    b, t, _ = keys.shape
    k = _head_norm(attn, "k_norm", keys.view(b, t, -1, attn.head_dim)).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.transpose(1, 2).reshape(b, t, -1)


def is_decoding(kwargs: dict, layer: int) -> bool:
    """True when decoder layer ``layer`` is called for new tokens after a cached prompt."""
    cache = kwargs.get("past_key_values")
    return cache is not None and cache.get_seq_length(layer) > 0


@dataclass
class Drop:
    """A hard removal inside the LLM, before decoder layer ``layer``.

    columns: ``(B, L')`` the original column of each column still in the sequence.
    positions: ``(B, L')`` the original column whose position (and RoPE table) each takes: its own,
        or, after a stage that renumbers positions, the one holding its new, gap-free position.
    shift: ``(B,)`` how far positions after the prompt move down (tokens generated later).
    key_bias: ``(B, L')`` additive bias on the keys of the columns (``-inf`` on slots that only pad
        a row keeping fewer tokens), or None.
    renumbered: this or an earlier removal renumbered positions (``shift`` may then be non-zero;
        known on the host, so decoding need not read ``shift`` to know).
    """

    layer: int
    columns: torch.Tensor
    positions: torch.Tensor
    shift: torch.Tensor
    key_bias: torch.Tensor | None = None
    inserted: bool = False  # this or an earlier stage put tokens of its own into the sequence
    renumbered: bool = False


def drop_before(layer: int, previous: Drop | None, columns: torch.Tensor, local: torch.Tensor | None,
                length: int, key_bias: torch.Tensor | None, renumber: bool,
                position_ids: torch.Tensor | None) -> Drop:
    """The removal before decoder layer ``layer`` keeping the original ``columns`` ``(B, L')`` of a
    prompt of ``length`` columns (``local``: the current columns they are), after ``previous``.

    A method whose paper renumbers positions 0..L'-1 (``renumber``) closes the gaps: each real
    column takes the position of its rank among the real ones that stay; position_ids: ``(1 or B,
    length)`` the model's original ones (left padding is read from them).
    """
    b = columns.shape[0]
    positions = previous.positions if previous else columns.new_tensor(range(length)).expand(b, -1)
    shift = previous.shift if previous else columns.new_zeros(b)
    if not renumber:
        return Drop(layer, columns, positions.gather(1, local), shift, key_bias,
                    renumbered=previous is not None and previous.renumbered)
    original = position_ids.expand(b, -1)
    padding = length - 1 - original[:, -1]  # (B,) left padding: a row's last column is real
    real = columns >= padding[:, None]
    if key_bias is not None:  # slots that only pad a row keeping fewer take no position
        real &= key_bias > most_negative(key_bias.dtype) / 2
    rank = real.long().cumsum(1) - 1
    holding = torch.where(real, padding[:, None] + rank, columns)  # the original column at that position
    return Drop(layer, columns, holding, length - padding - real.sum(1), key_bias, renumbered=True)


def layer_kwargs(kwargs: dict, hidden: torch.Tensor, drop: Drop | None, biases: list[torch.Tensor],
                 length: int, rotary_emb, layer: int, decoding: bool) -> dict:
    """``attention_mask``, ``position_embeddings`` and ``position_ids`` for decoder layer ``layer``
    after the latest hard removal ``drop`` (gathered to its kept columns), or with soft mode's
    ``biases`` (each ``(B, length)`` additive key bias over the original columns) added.

    kwargs: what the model passes the layer (4D mask ``(1 or B, 1, q, keys)`` or None, RoPE tables
    ``(1 or B, q, d_head)``, ``position_ids`` ``(1 or B, q)``, ``past_key_values``); hidden:
    ``(B, q, d)`` its input; length: the prompt's columns as the LLM received it; rotary_emb: the
    model's RoPE module (new positions while decoding after renumbering); decoding: ``q`` new
    tokens after a cached prompt, whose cached K/V at this layer are the kept columns only.
    """
    gather = None if drop is None else drop.columns
    bias = torch.stack(biases).sum(0).clamp(min=most_negative(hidden.dtype)) if biases else None  # (B, L)
    if drop is not None:  # hard mode: the padding of the sequence as it now is
        bias = drop.key_bias
    kwargs = dict(kwargs)
    mask = kwargs.get("attention_mask")
    b, q = hidden.shape[:2]
    if gather is not None and not decoding:
        original = kwargs["position_ids"].expand(b, -1) if kwargs.get("position_ids") is not None else None
        cos, sin = kwargs["position_embeddings"]
        at = drop.positions  # the original column holding each column's position
        kwargs["position_embeddings"] = tuple(
            t.expand(b, -1, -1).gather(1, at[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].expand(b, -1).gather(1, at)
        # Made tokens have no original column: causal by their order, padding masked. No mask from the model
        # (no padding: fused attention's causal path) stays none, which is that order already.
        if drop.inserted and mask is not None:
            padded = gather < (length - 1 - original[:, -1:])  # left padding: the last column is real
            allowed = torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()[None] & ~padded[:, None, :]
            mask = torch.where(allowed, 0.0, most_negative(hidden.dtype)).to(hidden.dtype)[:, None]
        elif mask is not None:
            mask = mask.expand(b, -1, -1, -1)
            mask = mask.gather(2, gather[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
            mask = mask.gather(3, gather[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    elif gather is not None:  # decoding: cached K/V of this layer are shorter
        if mask is not None:
            new = torch.arange(length, mask.shape[-1], device=mask.device).expand(b, -1)
            columns = torch.cat([gather, new], 1)
            mask = mask.expand(b, -1, -1, -1)
            mask = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
        if drop.renumbered:  # new tokens follow the shorter prompt (a shift of 0 changes nothing)
            positions = kwargs["position_ids"].expand(b, -1) - drop.shift[:, None]
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = rotary_emb(hidden, positions)
    if bias is not None:
        keys = bias.shape[1] if not decoding else (mask.shape[-1] if mask is not None else
                                                 kwargs["past_key_values"].get_seq_length(layer) + q)
        mask = as_additive(mask, b, q, keys, hidden.dtype, hidden.device)
        extra = keys - bias.shape[1]
        full = torch.cat([bias, bias.new_zeros(b, extra)], 1) if extra > 0 else bias
        mask = (mask + full[:, None, None, :]).clamp(min=most_negative(hidden.dtype))
    kwargs["attention_mask"] = mask
    return {name: kwargs.get(name) for name in ("attention_mask", "position_embeddings", "position_ids")}


def adjusted_layer_kwargs(cache: dict, kwargs: dict, hidden: torch.Tensor, drops: list, biases: list,
                          length: int, rotary, k: int, decoding: bool) -> dict:
    """Decoder layer ``k``'s kwargs after the removals before it (``drops``: hard) and with the key biases
    of the stages up to it (``biases``: ``(layer, (B, L))`` pairs; soft, and the padding of rows that keep
    fewer tokens in hard). Every layer receives the same original tensors from the model, so the adjusted
    ones are computed once per (stages in effect, originals), kept in ``cache``, and reused by later layers."""
    n_drops = sum(drop.layer <= k for drop in drops)
    n_biases = sum(layer <= k for layer, _ in biases)
    if n_drops == 0 and n_biases == 0:
        return kwargs
    originals = tuple(kwargs.get(name) for name in ("attention_mask", "position_embeddings", "position_ids"))
    cached = cache.get((n_drops, n_biases, decoding))
    if cached is None or any(a is not b for a, b in zip(cached[0], originals)):
        adjusted = layer_kwargs(kwargs, hidden, drops[n_drops - 1] if n_drops else None,
                                [bias for _, bias in biases[:n_biases]], length, rotary, k, decoding)
        cached = cache[(n_drops, n_biases, decoding)] = (originals, adjusted)
    return {**kwargs, **cached[1]}
