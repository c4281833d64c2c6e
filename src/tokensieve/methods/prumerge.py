"""PruMerge and PruMerge+ (Shang et al., 2024) as released in 42Shawn/LLaVA-PruMerge.

Both score the patch tokens by the CLS attention of the vision tower's LAST block taken as one
full-width head, keep the high-scoring ones, add to each kept token the attention-weighted sum
of its 32 nearest tokens (cosine of that block's full-width keys, among all other tokens), and
append one extra token: the attention-weighted sum of the pruned tokens. PruMerge keeps the
top tokens by attention; PruMerge+ adds positions of a regular stride over the grid.

The paper's count is adaptive (the IQR outliers of the attention); the engine's budgets are
exact. The pure functions here reproduce the adaptive rule (``count=None``); the methods keep
``budget - 1`` tokens plus the extra token (see the class docstrings and docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import complement, gather_tokens

_PAPER = ("Shang, Cai, Xu, Lee, Yan. LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large "
          "Multimodal Models. arXiv:2403.15388 (2024)")
_SIGNALS = ("last_block_cls_attention", "last_block_keys")


def iqr_outlier_ratio(cls_attention: torch.Tensor) -> float:
    """Share of the values of ``cls_attention`` (any shape) above ``Q3 + 1.5 * IQR`` of all of them.

    The paper's adaptive rule. The released code pools the whole batch ``(B, N)`` into one
    threshold; pass one row (``(1, N)``) for a sample alone. Quartiles are linear-interpolated
    in float32, as ``numpy.percentile`` computes them on the float32 array the reference makes.
    """
    values = cls_attention.detach().float().flatten()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], device=values.device))
    return int((values > q3 + 1.5 * (q3 - q1)).sum()) / values.numel()


def adaptive_count(cls_attention: torch.Tensor) -> int:
    """The paper's number of kept tokens per row, ``int(N * ratio)`` with the ratio of
    :func:`iqr_outlier_ratio` over the whole ``(B, N)`` batch (one count for every row)."""
    return int(cls_attention.shape[1] * iqr_outlier_ratio(cls_attention))


def prumerge_keep(cls_attention: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``(B, K)`` indices of the ``K`` highest CLS attentions, highest first (the reference's
    order); ``K = count``, or the paper's :func:`adaptive_count` when ``count`` is None."""
    k = adaptive_count(cls_attention) if count is None else count
    return cls_attention.topk(k, dim=1).indices


def plus_stride(ratio: float) -> int:
    """PruMerge+'s grid stride ``int(int(1 / ratio) / 3)`` for an outlier ratio ``ratio``."""
    if ratio <= 0:
        raise TokensieveError("PruMerge+ has no IQR outliers to set its grid stride from (the released code "
                              "divides by zero here)")
    return int(int(1 / ratio) / 3)  # >= 1: fewer than a quarter of the values lie above Q3


def prumerge_plus_row(cls_attention: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``(K,)`` kept indices of one row ``(N,)`` in the reference's order.

    The paper's rule (``count`` None): the ``o = int(N * ratio)`` IQR outliers by CLS attention
    (highest first), then the positions ``0, s, 2s, ... < N - 1`` that are not outliers
    (ascending), ``s = int(int(1 / ratio) / 3)`` (the released code hard-codes ``N - 1 = 575``).

    With an exact ``count`` (ours; the paper's rule gives whatever count the data gives): the
    same outliers (the top ``count`` if there are more) and grid; if together they exceed
    ``count``, ``count - o`` grid positions evenly spread over the grid's list (element
    ``floor((j + 0.5) * G / (count - o))`` of its ``G``), if they fall short, the next tokens by
    CLS attention, highest first. Equal to the paper's rule when ``count`` is the paper's count.
    A row with no IQR outlier is taken as having one, its highest attention (``ratio = 1 / N``);
    the paper's code fails there.
    """
    n = cls_attention.shape[0]
    ratio = iqr_outlier_ratio(cls_attention)
    if count is not None and ratio == 0:
        ratio = 1 / n
    outliers = cls_attention.topk(int(n * ratio), dim=0).indices
    grid = torch.arange(0, n - 1, plus_stride(ratio), device=cls_attention.device)
    grid = grid[~torch.isin(grid, outliers)]
    if count is None:
        return torch.cat([outliers, grid])
    outliers = outliers[:count]
    want = count - outliers.shape[0]
    if grid.shape[0] > want:  # element floor((j + 0.5) * G / want) of the G grid positions
        spread = (2 * torch.arange(want, device=grid.device) + 1) * grid.shape[0] // max(2 * want, 1)
        grid = grid[spread]
    chosen = torch.cat([outliers, grid])
    if chosen.shape[0] < count:
        rest = cls_attention.clone()
        rest[chosen] = -torch.inf
        chosen = torch.cat([chosen, rest.topk(count - chosen.shape[0]).indices])
    return chosen


def prumerge_plus_keep(cls_attention: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``(B, K)`` kept indices per row by :func:`prumerge_plus_row`, each row on its own (the
    released code runs at batch 1 only). With ``count`` None the rows must give equal counts."""
    rows = [prumerge_plus_row(row, count) for row in cls_attention]
    if len({r.shape[0] for r in rows}) > 1:
        counts = ", ".join(str(r.shape[0]) for r in rows)
        raise TokensieveError(f"PruMerge+'s adaptive counts differ between rows ({counts}); pass one row at a time "
                              "or give a count")
    return torch.stack(rows)


def prumerge_merge(tokens: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor,
                   neighbours: int = 32, among: str = "all", merge: str = "sum") -> torch.Tensor:
    """``(B, K, d)``: the kept tokens ``kept`` ``(B, K)`` after merging their neighbours into them.

    tokens: ``(B, N, d)``; cls_attention ``a``: ``(B, N)``; keys: ``(B, N, d_k)``. Each kept token
    ``i`` finds its ``neighbours`` tokens of highest key cosine similarity among ``among``:
    ``"all"`` other ``N - 1`` tokens, kept ones included (the paper), or ``"pruned"`` tokens only
    (ours). ``merge="sum"`` gives ``x_i + sum_j a_j x_j`` (the paper: unnormalised, it changes the
    token's scale); ``"mean"`` the weighted mean ``(a_i x_i + sum_j a_j x_j) / (a_i + sum_j a_j)``
    (ours). Neighbours are read from the original tokens, never from already merged ones.
    """
    b, n, _ = tokens.shape
    a = cls_attention.float()
    unit = nn.functional.normalize(keys.float(), dim=-1)
    similarity = gather_tokens(unit, kept) @ unit.transpose(1, 2)  # (B, K, N)
    excluded = torch.zeros_like(similarity, dtype=torch.bool).scatter_(2, kept[..., None], True)
    if among == "pruned":
        excluded |= torch.zeros(b, 1, n, dtype=torch.bool, device=kept.device).scatter_(2, kept[:, None], True)
    k = min(neighbours, n - (kept.shape[1] if among == "pruned" else 1))
    nearest = similarity.masked_fill(excluded, -torch.inf).topk(k, dim=-1).indices  # (B, K, k)
    weights = a[:, None, :].expand_as(similarity).gather(2, nearest)  # (B, K, k)
    x = tokens.float()
    pulled = (weights[..., None] * gather_tokens(x, nearest.flatten(1)).view(*nearest.shape, -1)).sum(2)
    x_kept, a_kept = gather_tokens(x, kept), a.gather(1, kept)
    if merge == "sum":
        merged = x_kept + pulled
    else:
        mass = a_kept + weights.sum(-1)
        total = a_kept[..., None] * x_kept + pulled
        merged = torch.where(mass[..., None] > 0, total / mass.clamp_min(torch.finfo(total.dtype).tiny)[..., None],
                             x_kept)
    return merged.to(tokens.dtype)


def pruned_summary(tokens: torch.Tensor, cls_attention: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(B, 1, d)``: the paper's extra token, ``sum_j a_j x_j`` over the tokens not in ``kept``."""
    pruned = complement(kept, tokens.shape[1])
    weights = cls_attention.float().gather(1, pruned)
    return (weights[..., None] * gather_tokens(tokens.float(), pruned)).sum(1, keepdim=True).to(tokens.dtype)


@dataclass
class _PruMergeBase(Method):
    """What PruMerge and PruMerge+ share: the signals, the merge, the extra token and the options."""

    paper = _PAPER
    stages = ("projector",)
    default_site = "projector"
    signals = _SIGNALS

    merge_neighbours: int = 32
    merge: str = "sum"
    neighbours_among: str = "all"
    extra_token: bool = True
    order: str = "ranked"

    def __post_init__(self):
        n = self.merge_neighbours
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TokensieveError(f"{self.name}: merge_neighbours must be a whole number >= 0, got {n!r}")
        for option, value, choices in (("merge", self.merge, ("sum", "mean")),
                                       ("neighbours_among", self.neighbours_among, ("all", "pruned")),
                                       ("extra_token", self.extra_token, (True, False)),
                                       ("order", self.order, ("ranked", "positions"))):
            if value not in choices:
                raise TokensieveError(f"{self.name}: {option} {value!r} is not one of {', '.join(map(str, choices))}")

    @property
    def makes_extra_tokens(self) -> bool:
        """True with the paper's extra token (``extra_token=True``)."""
        return self.extra_token

    def _keep(self, att: torch.Tensor, count: int) -> torch.Tensor:
        """``(B, count)`` kept indices in the released code's order."""
        raise NotImplementedError

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if self.extra_token and keep < 2:
            raise TokensieveError(f"{self.name}: a budget of {keep} at {site} leaves no room for a kept token beside "
                                  "its extra token; keep at least 2 (or set extra_token=False)")

    def select(self, inputs: SiteInputs) -> Selection:
        self.check(inputs.tokens.shape[1], inputs.keep, inputs.site)
        tokens = inputs.tokens
        n = tokens.shape[1]
        att, keys = inputs.signal("last_block_cls_attention"), inputs.signal("last_block_keys")
        kept = self._keep(att, inputs.keep - 1 if self.extra_token else inputs.keep)
        merged = None
        if self.merge_neighbours and kept.shape[1] < n:
            merged = prumerge_merge(tokens, att, keys, kept, self.merge_neighbours, self.neighbours_among, self.merge)
        extra = pruned_summary(tokens, att, kept) if self.extra_token else None
        kept, slot = kept.sort(1)
        merged = None if merged is None else gather_tokens(merged, slot)
        # "ranked": the kept tokens enter in the released code's order (slot.argsort(1) undoes the sort)
        order = slot.argsort(1) if self.order == "ranked" else None
        return Selection(kept, merged, extra=extra, extra_first=False, order=order)


@register
@dataclass
class PruMerge(_PruMergeBase):
    """PruMerge: the tokens the last block's CLS attends to most, each merged with its neighbours,
    plus one token summarising the pruned ones.

    Signals: ``last_block_cls_attention`` ``(B, N)`` (the last block's CLS query over the
    full width, one softmax) and ``last_block_keys`` ``(B, N, d_vision)``. Site: the projector
    (the tower's output, before the projector), as in the released code.

    Count: the paper keeps ``int(N * r)`` tokens, ``r`` the share of IQR outliers of the CLS
    attention (pooled over the batch), a count set by the data; the engine's budgets are exact,
    so here the stage's budget is that count plus one (the extra token): ``budget - 1`` tokens
    of highest CLS attention are kept. A budget of ``adaptive_count(att) + 1`` gives exactly
    the paper's tokens. Each kept token becomes ``x_i + sum_j a_j x_j`` over its
    ``merge_neighbours`` nearest other tokens (key cosine, kept ones included); the extra token
    ``sum_j a_j x_j`` over the pruned tokens follows the kept ones. The kept tokens enter the
    image run in the released code's order, highest attention first (``order="ranked"``).

    Our options, off by default: ``merge="mean"`` (weighted mean of the token and its
    neighbours, keeps the scale), ``neighbours_among="pruned"`` (merge only pruned tokens),
    ``extra_token=False`` (the whole budget is kept tokens), ``order="positions"`` (kept tokens
    stay in raster order).
    """

    name = "prumerge"

    def _keep(self, att: torch.Tensor, count: int) -> torch.Tensor:
        return prumerge_keep(att, count)


@register
@dataclass
class PruMergePlus(_PruMergeBase):
    """PruMerge+: PruMerge's outliers plus the positions of a regular grid, then the same merge
    and extra token.

    The paper's rule per image (:func:`prumerge_plus_row`): the ``o`` IQR outliers of the last
    block's CLS attention, then every position ``0, s, 2s, ... < N - 1`` not among them, with
    ``s = int(int(1 / r) / 3)`` (``r = o / N``): about three grid tokens per outlier, ~25% of
    the tokens in all. The count is set by the data; the engine's budgets are exact, so the
    stage's budget is the number of kept tokens plus one (the extra token): the outliers and
    grid are computed as the paper does, then thinned evenly (too many) or topped up by CLS
    attention (too few) to ``budget - 1``. A budget of the paper's count plus one gives exactly
    its tokens. Each row is taken on its own (the released code runs at batch 1 only). The kept
    tokens enter in the released code's order: outliers by descending attention, then the grid.

    Options, off by default and ours, as for :class:`PruMerge`.
    """

    name = "prumerge_plus"
    paper = _PAPER + " (PruMerge+)"

    def _keep(self, att: torch.Tensor, count: int) -> torch.Tensor:
        return prumerge_plus_keep(att, count)
