"""PruMerge and PruMerge+: keep CLS-attention outliers (plus spatial samples), merge neighbours into them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import complement, cosine_matrix, gather_tokens, topk_sorted

_PAPER = ("Shang, Cai, Xu, Lee, Yan. LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large "
          "Multimodal Models. arXiv:2403.15388 (2024)")


def iqr_outliers(cls_attention: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: tokens whose CLS attention lies above ``Q3 + 1.5 * IQR`` of their row.

    This is PruMerge's adaptive selection (interquartile range rule, linear-interpolated
    quartiles as in ``numpy.percentile``), computed per row.
    """
    q1, q3 = torch.quantile(cls_attention.float(), torch.tensor([0.25, 0.75], device=cls_attention.device),
                            dim=1)
    return cls_attention.float() > (q3 + 1.5 * (q3 - q1))[:, None]


def prumerge_keep(cls_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """``(B, keep)`` sorted indices: IQR outliers first, filled or trimmed by CLS attention.

    Outliers are by definition the tokens of highest CLS attention, so "outliers first, then
    the next by CLS attention until the budget is met; or, with more outliers than the budget,
    the ``keep`` outliers of highest attention" is exactly the top ``keep`` by CLS attention.
    The kept set therefore contains every IQR outlier whenever ``keep`` is at least
    ``iqr_outliers(...).sum(1)`` (the paper's adaptive count, which this budget replaces).
    """
    return topk_sorted(cls_attention, keep)


def prumerge_plus_keep(cls_attention: torch.Tensor, keep: int, uniform: int) -> torch.Tensor:
    """``(B, keep)`` sorted indices: ``keep - uniform`` by :func:`prumerge_keep`, then ``uniform``
    spatially spread samples from the tokens not yet chosen.

    The spread samples are evenly spaced over the not-yet-chosen tokens in raster (index)
    order, each at the centre of its stretch: position ``floor((j + 0.5) * R / uniform)`` of the
    ``R`` remaining tokens, ``j = 0 .. uniform - 1``.
    """
    b, n = cls_attention.shape
    outliers = cls_attention.topk(keep - uniform, dim=1).indices
    if uniform == 0:
        return outliers.sort(1).values
    rest = complement(outliers, n)  # (B, R), R >= uniform
    r = rest.shape[1]
    slots = (2 * torch.arange(uniform, device=rest.device) + 1) * r // (2 * uniform)  # floor((j + 0.5) R / u)
    return torch.cat([outliers, rest[:, slots]], 1).sort(1).values


def prumerge_merge(tokens: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor,
                   kept: torch.Tensor, neighbours: int) -> torch.Tensor | None:
    """New contents of the kept tokens after merging their nearest pruned tokens into them.

    tokens: ``(B, N, d)``; cls_attention: ``(B, N)``; keys: ``(B, N, d_k)``; kept: ``(B, K)``.
    Each kept token ``i`` finds its ``neighbours`` pruned tokens of highest key cosine
    similarity (a pruned token may serve several kept ones) and becomes the CLS-attention
    weighted mean ``(a_i x_i + sum_j a_j x_j) / (a_i + sum_j a_j)`` of itself and them (a token
    whose weights sum to 0 is left as it was). Returns ``(B, K, d)``, or ``None`` when nothing
    merges (no pruned tokens or ``neighbours == 0``).
    """
    b, n, _ = tokens.shape
    if neighbours == 0 or kept.shape[1] == n:
        return None
    pruned = complement(kept, n)  # (B, D)
    k = min(neighbours, pruned.shape[1])
    similarity = cosine_matrix(gather_tokens(keys.float(), kept), gather_tokens(keys.float(), pruned))  # (B, K, D)
    nearest = similarity.topk(k, dim=-1).indices  # (B, K, k)
    pruned_weight = cls_attention.float().gather(1, pruned)  # (B, D)
    neighbour_weight = pruned_weight[:, None, :].expand_as(similarity).gather(2, nearest)  # (B, K, k)
    weights = torch.zeros_like(similarity).scatter_(2, nearest, neighbour_weight)  # (B, K, D)
    x_kept = gather_tokens(tokens, kept).float()
    a_kept = cls_attention.float().gather(1, kept)
    total = a_kept[..., None] * x_kept + weights @ gather_tokens(tokens, pruned).float()
    mass = a_kept + weights.sum(-1)
    safe = mass.clamp_min(torch.finfo(total.dtype).tiny)[..., None]
    merged = torch.where(mass[..., None] > 0, total / safe, x_kept)
    return merged.to(tokens.dtype)


def _check_neighbours(method: str, neighbours: int) -> None:
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 0:
        raise TokensieveError(f"{method}: merge_neighbours must be a whole number >= 0, got {neighbours!r}")


@register
@dataclass
class PruMerge(Method):
    """PruMerge: keep the tokens CLS attends to unusually much, merge similar pruned tokens into them.

    Scores: ``cls_attention`` (B, N). PruMerge keeps the IQR outliers (above ``Q3 + 1.5 IQR``),
    an adaptive count; our budgets are exact, so the kept tokens are the outliers first, then
    filled (or trimmed) by CLS attention to ``keep`` — i.e. the top ``keep`` by CLS attention,
    see :func:`prumerge_keep` (the adaptive count is :func:`iqr_outliers` summed, for choosing
    a budget). Then each kept token becomes the CLS-attention weighted mean of itself and its
    ``merge_neighbours`` pruned tokens nearest by ``keys`` cosine similarity. Acts on the vision
    tower's output (default site ``projector``) or before a vision block.

    Differences from the paper's code: the released code computes the IQR threshold once over
    the whole batch, loops over samples and kept tokens, searches neighbours among *all* other
    tokens (kept ones too), and adds the unnormalised attention-weighted sum of the neighbours
    to the token (``x_i + sum_j a_j x_j``), which changes its scale; here the threshold is per
    row, neighbours are pruned tokens only, the update is a normalised weighted mean, and
    everything is batched tensor code. Some released versions also append one extra token
    (the attention-weighted sum of all pruned tokens); we do not, so budgets stay exact.
    """

    name = "prumerge"
    paper = _PAPER
    stages = ("vision", "projector")
    default_site = "projector"
    signals = ("cls_attention", "keys")

    merge_neighbours: int = 32

    def select(self, inputs: SiteInputs) -> Selection:
        _check_neighbours(self.name, self.merge_neighbours)
        att, keys = inputs.signal("cls_attention"), inputs.signal("keys")
        kept = prumerge_keep(att, inputs.keep)
        return Selection(kept, prumerge_merge(inputs.tokens, att, keys, kept, self.merge_neighbours))


@register
@dataclass
class PruMergePlus(Method):
    """PruMerge+: PruMerge's outliers plus spatially uniform samples, then the same merge.

    ``keep - round(uniform_share * keep)`` tokens are chosen as in PruMerge (IQR outliers
    first, then by ``cls_attention``) and ``round(uniform_share * keep)`` evenly spaced tokens
    among the rest (raster order) complete the budget (see :func:`prumerge_plus_keep`); then
    every kept token merges its ``merge_neighbours`` nearest pruned tokens by ``keys``
    similarity, weighted by CLS attention, as in :class:`PruMerge`.

    Differences from the paper's code: the released code takes the IQR outliers (an adaptive
    count, about 5.5% of the tokens) and adds the positions of an arithmetic sequence over the
    whole grid (stride a third of ``1 / outlier_ratio``) that were not already chosen, about
    25% of the tokens in total; in that mix the uniform samples outnumber the outliers roughly
    3 to 1 (``uniform_share`` near 0.75). Here the split is the ``uniform_share`` parameter of an
    exact budget (default 0.25: 75% outlier-based, 25% uniform), and the uniform samples are
    spread over the tokens not already chosen, so there is no overlap to skip. The merge
    differs as described for :class:`PruMerge`.
    """

    name = "prumerge_plus"
    paper = _PAPER + " (PruMerge+)"
    stages = ("vision", "projector")
    default_site = "projector"
    signals = ("cls_attention", "keys")

    merge_neighbours: int = 32
    uniform_share: float = 0.25

    def select(self, inputs: SiteInputs) -> Selection:
        _check_neighbours(self.name, self.merge_neighbours)
        if not 0 <= self.uniform_share <= 1:
            raise TokensieveError(f"{self.name}: uniform_share {self.uniform_share} is not in [0, 1]")
        att, keys = inputs.signal("cls_attention"), inputs.signal("keys")
        uniform = min(inputs.keep, round(self.uniform_share * inputs.keep))
        kept = prumerge_plus_keep(att, inputs.keep, uniform)
        return Selection(kept, prumerge_merge(inputs.tokens, att, keys, kept, self.merge_neighbours))
