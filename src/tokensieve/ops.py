"""Pure tensor functions shared by backbones and methods (no model knowledge here)."""

from __future__ import annotations

import math

import torch
from torch import nn


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(B, N, ...)`` at ``index`` ``(B, K)`` -> ``(B, K, ...)``."""
    expanded = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores of each row of ``(B, N)``, in ascending order."""
    return scores.topk(k, dim=1).indices.sort(1).values


def diverse_topk(scores: torch.Tensor, features: torch.Tensor, k: int, weight: float,
                 radius: float | None = None) -> torch.Tensor:
    """Indices ``(B, k)``, ascending, of high-scoring tokens that are not alike: a greedy top-k.

    scores: ``(B, N)``; features: ``(B, N, d)``. Each row's scores are standardised (zero mean,
    unit deviation, so ``weight`` means the same for any scorer), then ``k`` times the token
    maximising ``score - weight * max(0, highest likeness to a token already picked)`` is
    picked. ``weight`` 0 is plain top-k; larger spreads the picks over distinct content.
    Likeness is cosine similarity; with ``radius`` the tokens are a square patch grid (``N =
    g * g``, row-major) and a pick's likeness fades with the distance ``d`` in patches as
    ``exp(-(d / radius) ** 2)``: only alike tokens *near* a pick (more of the same object) are
    penalised, so two alike objects apart can both be picked. A pick scored below its row's
    mean (background, filler) still penalises alike tokens at any distance: background is one
    thing however far it spreads, and centres spent on more of it are lost to the objects.
    """
    if weight == 0:
        return topk_sorted(scores, k)
    b, n = scores.shape
    x = nn.functional.normalize(features.float(), dim=-1)
    z = scores.float()
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True).clamp_min(1e-6)
    nearness = None if radius is None else _grid_nearness(n, radius, scores.device)  # (N, N)
    rows = torch.arange(b, device=scores.device)
    picked = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    likeness = torch.zeros(b, n, device=scores.device)  # highest likeness to a pick, floored at 0
    picks = []
    for _ in range(k):
        pick = (z - weight * likeness).masked_fill(picked, -math.inf).argmax(1)
        picks.append(pick)
        picked[rows, pick] = True
        alike = (x @ x[rows, pick][..., None]).squeeze(-1)
        if nearness is not None:
            important = (z[rows, pick] > 0)[:, None]
            alike = torch.where(important, alike * nearness[pick], alike)
        likeness = torch.maximum(likeness, alike)
    return torch.stack(picks, 1).sort(1).values


def _grid_nearness(n: int, radius: float, device: torch.device) -> torch.Tensor:
    """``exp(-(d / radius) ** 2)`` ``(N, N)`` for the distances ``d`` between the cells of a
    square grid of ``N`` cells, row-major."""
    g = math.isqrt(n)
    if g * g != n or radius <= 0:
        raise ValueError(f"a nearness radius needs a square grid of tokens and a positive radius "
                         f"(got {n} tokens, radius {radius})")
    cells = torch.arange(n, device=device)
    position = torch.stack([cells // g, cells % g], -1).float()
    return torch.exp(-(torch.cdist(position, position) / radius) ** 2)


def complement(index: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted indices ``(B, n - K)`` of ``0..n-1`` not in ``index`` ``(B, K)`` (unique per row)."""
    taken = torch.zeros(index.shape[0], n, dtype=torch.uint8, device=index.device)
    taken.scatter_(1, index, 1)
    # A stable sort puts the untaken first, in index order; a boolean mask would wait for the device.
    return taken.argsort(dim=1, stable=True)[:, :n - index.shape[1]]


def trues_first(mask: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` positions along the last dimension of ``mask`` ``(..., N)`` bool: its True ones first,
    then its False ones, each in increasing order. With a count known on the host, a row's first ``count``
    are its True positions, as ``nonzero`` would give them without waiting for the device."""
    return (~mask).to(torch.uint8).argsort(dim=-1, stable=True)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` ``(B, N, d)`` to every row of ``b`` ``(B, M, d)``: ``(B, N, M)``.
    ``b`` may be ``a`` itself, normalised once then."""
    unit_a = nn.functional.normalize(a, dim=-1)
    unit_b = unit_a if b is a else nn.functional.normalize(b, dim=-1)
    return unit_a @ unit_b.transpose(1, 2)


def merge_into(kept: torch.Tensor, dropped: torch.Tensor, target: torch.Tensor,
               kept_weight: torch.Tensor | None = None, dropped_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of each kept token with the dropped tokens assigned to it.

    kept: ``(B, K, d)``; dropped: ``(B, D, d)``; target: ``(B, D)`` index into ``K`` for each
    dropped token; weights ``(B, K)`` / ``(B, D)`` default to 1 (e.g. ToMe's token sizes).
    Returns ``(B, K, d)``; a kept token nothing merged into is unchanged.
    """
    kw = kept_weight if kept_weight is not None else kept.new_ones(kept.shape[:2])
    dw = dropped_weight if dropped_weight is not None else dropped.new_ones(dropped.shape[:2])
    total = (kept * kw[..., None]).scatter_add(1, target[..., None].expand_as(dropped), dropped * dw[..., None])
    weight = kw.scatter_add(1, target, dw)
    return total / weight[..., None]
