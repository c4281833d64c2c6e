"""The anchor rule: anchors by CLS attention, then tokens that attend to them or differ from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.methods.tower_importance import importance_signals
from tokensieve.ops import cosine_matrix, gather_tokens


def anchor_importance(keys: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` mean attention from each token to the anchors, estimated from keys alone.

    keys: ``(B, N, d_k)``; anchors: ``(B, k)`` indices. Without the block's full attention
    matrix, token ``i``'s attention row is ``softmax_j(k_i . k_j / sqrt(d_k))`` over all ``N``
    tokens (keys standing in for queries); the importance is its mean over the anchors' columns.
    """
    keys = keys.float()
    logits = keys @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])  # (B, N, N)
    attention = logits.log_softmax(-1).gather(2, anchors[:, None, :].expand(-1, keys.shape[1], -1)).exp()
    return attention.mean(-1)


def anchor_attention_importance(attention: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` mean attention from each token to the anchors, read from the block's attention.

    attention: ``(B, N, N)`` head-averaged attention among the tokens (row ``i`` is token ``i``'s
    attention, normalised over every token of the block); anchors: ``(B, k)`` indices.
    """
    return attention.float().gather(2, anchors[:, None, :].expand(-1, attention.shape[1], -1)).mean(-1)


def anchor_diversity(keys: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` ``1 -`` the highest key cosine similarity of each token to any anchor."""
    keys = keys.float()
    return 1 - cosine_matrix(keys, gather_tokens(keys, anchors)).max(-1).values


def minmax_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rescale each row of ``x`` ``(B, N)`` to [0, 1] by the min and max over its ``valid``
    ``(B, N)`` entries (a row whose valid entries are all equal becomes 0)."""
    low = x.masked_fill(~valid, math.inf).amin(1, keepdim=True)
    high = x.masked_fill(~valid, -math.inf).amax(1, keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def anchor_keep(cls_attention: torch.Tensor, keys: torch.Tensor, k_anchors: int, top_m: int,
                alpha: float, attention: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, k_anchors + top_m)`` sorted indices: the anchors and the ``top_m`` best-scored others.

    cls_attention: ``(B, N)``; keys: ``(B, N, d_k)``; attention: optional ``(B, N, N)`` block
    attention. Anchors are the ``k_anchors`` tokens of highest CLS attention. Every other token is
    scored ``alpha * I + (1 - alpha) * D`` with importance ``I`` (:func:`anchor_attention_importance`
    when ``attention`` is given, else the key estimate :func:`anchor_importance`) and diversity
    ``D`` (:func:`anchor_diversity`), each min-max normalised to [0, 1] over the row's non-anchor
    tokens before mixing.
    """
    anchors = cls_attention.topk(k_anchors, dim=1).indices
    if top_m == 0:
        return anchors.sort(1).values
    is_anchor = torch.zeros_like(cls_attention, dtype=torch.bool).scatter_(1, anchors, True)
    raw = anchor_importance(keys, anchors) if attention is None else anchor_attention_importance(attention, anchors)
    importance = minmax_rows(raw, ~is_anchor)
    diversity = minmax_rows(anchor_diversity(keys, anchors), ~is_anchor)
    score = (alpha * importance + (1 - alpha) * diversity).masked_fill(is_anchor, -math.inf)
    return torch.cat([anchors, score.topk(top_m, dim=1).indices], 1).sort(1).values


@register
@dataclass
class Anchor(Method):
    """The anchor rule (docs/DESIGN.md): CLS + anchors + the top-m tokens by importance and diversity.

    Picks ``k_anchors`` anchors by ``cls_attention`` (B, N); scores every other token by
    ``alpha * I + (1 - alpha) * D``, where ``I`` is the mean attention from the token to the
    anchors — read from the block's ``attention`` (B, N, N) where the backbone provides it (CLIP
    ViT adapters recompute it from the block's own q/k projections), else rebuilt from ``keys``
    (B, N, d_k) as ``softmax_j(k_i . k_j / sqrt(d_k))`` (LLaVA sites capture keys only) — and
    ``D`` is ``1 -`` its highest key cosine similarity to an anchor; both are min-max normalised to
    [0, 1] over the row's non-anchor tokens before they are mixed, so ``alpha`` weighs
    comparable ranges. Keeps the anchors and the ``top_m`` best (CLS is a prefix token the
    backbone always keeps). Acts before a CLIP ViT block ``l >= 1`` (default ``vision.1``) or on
    the tower output.

    ``top_m=None`` fills the budget (``top_m = keep - k_anchors``); a ``top_m`` set explicitly
    must match the budget (``keep == k_anchors + top_m``). The design note gives the rule, not
    a published implementation; the key-based estimate of ``I`` is ours.
    ``attention`` is optional: a site without it falls back to the key estimate.
    ``importance="received_attention"`` picks the anchors by the attention each token receives in
    the tower's last block instead, for towers without CLS (Qwen-VL, at ``projector``).
    """

    name = "anchor"
    paper = "the anchor rule of the tokensieve design (training-free; CLS-attention anchors, importance + diversity)"
    stages = ("vision", "projector")
    default_site = "vision.1"
    signals = ("cls_attention", "keys")
    optional_signals = ("attention",)  # a site without it: the key estimate
    no_cls_options = {"importance": "received_attention"}  # its variant for a tower without CLS

    k_anchors: int = 10
    top_m: int | None = None
    alpha: float = 0.5
    importance: str = "cls_attention"

    def __post_init__(self):
        self.signals = importance_signals(self.name, self.importance, type(self).signals)

    def resolve_top_m(self, keep: int, n: int, site: str) -> int:
        """``top_m`` for a budget of ``keep`` of the ``n`` candidate tokens (``n + 1`` with CLS)."""
        k = self.k_anchors
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TokensieveError(f"anchor: k_anchors must be a whole number >= 1, got {k!r}")
        if self.top_m is not None and (isinstance(self.top_m, bool) or not isinstance(self.top_m, int)
                                       or self.top_m < 0):
            raise TokensieveError(f"anchor: top_m must be a whole number >= 0 or unset, got {self.top_m!r}")
        if not 0 <= self.alpha <= 1:
            raise TokensieveError(f"anchor: alpha {self.alpha} is not in [0, 1]")
        if k > keep:
            raise TokensieveError(f"anchor: k_anchors > keep: {k} anchors but the budget keeps only {keep} "
                                  f"tokens at {site}")
        m = keep - k if self.top_m is None else self.top_m
        if k + m + 1 > n + 1:
            raise TokensieveError(f"anchor: k_anchors + top_m + 1 > tokens: {k} + {m} + 1 > {n + 1} "
                                  f"({n} tokens + CLS at {site})")
        if k + m != keep:
            raise TokensieveError(f"anchor: k_anchors + top_m = {k} + {m} = {k + m} but the budget keeps {keep} "
                                  f"tokens at {site}; set the budget to {k + m} or leave top_m unset")
        return m

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        self.resolve_top_m(keep, n_tokens, site)

    def select(self, inputs: SiteInputs) -> Selection:
        m = self.resolve_top_m(inputs.keep, inputs.tokens.shape[1], inputs.site)
        att, keys = inputs.signal(self.importance), inputs.signal("keys")
        attention = inputs.signal("attention") if "attention" in inputs.signals and m > 0 else None
        return Selection(anchor_keep(att, keys, self.k_anchors, m, self.alpha, attention))
