"""SparseVLM: text raters score the image tokens inside the LLM; a rank decides how many stay.

As released for LLaVA-1.5 (Gumpest/SparseVLMs@b72c5d6, v1: ``llava/model/language_model/
modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``, ``score.py`` ``attn_postprocess_rank``,
``utils.py`` ``cluster_and_merge``). Once per prompt, the text tokens after the image whose
relevance to the image (the softmax over the text of ``image @ text^T`` on the LLM's input
embeddings, averaged over the image tokens) is above the mean become the *raters*. After decoder
layers 2, 6, 15 and 19 of 32 (our sites ``llm.3``, ``llm.7``, ``llm.16``, ``llm.20``), that layer's
head-averaged attention from the raters to the current image run is a ``(R, V)`` block; each image
token scores its column mean, and ``min(int(rank * scale + bias), V - 1)`` of them stay, ``rank``
the block's matrix rank (all stay when the rank is ``V``). Of the pruned, the top
``int(0.3 P) + 1`` by score are *recycled*: clustered by DPC-KNN into ``int(n / 10) + 1`` tokens
inserted right after the kept ones, where later steps may score, prune and recycle them again.
Positions are renumbered without gaps after each step; nothing is pruned while decoding.

Ours, where positions are not renumbered (``positions="original"``; Qwen-VL's 3-D M-RoPE ids have no
gap-free renumbering): a recycled token takes the position of its cluster's centre
(``Selection.extra_at``), the one pruned token DPC-KNN chose to stand for the cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, Method, Selection, SiteInputs, register
from tokensieve.methods.llm_schedule import (
    checked_layers,
    checked_positions,
    stage_layers,
)

PAPER_DEPTH = 32
PAPER_LAYERS = (2, 6, 15, 19)  # decoder layers (0-based) of 32 whose output the released code prunes
PAPER_IMAGE_TOKENS = 576
# The released scripts' (scale, bias) for the budgets the paper reports (README, scripts/v1_5/eval).
PAPER_SETTINGS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
DISTANCE_BLOCK = 2 ** 21  # elements of the (rows, n, d) differences DPC-KNN holds at once (8 MiB in float32)


def sparsevlm_layers(depth: int) -> tuple[int, ...]:
    """The pruning sites for an LLM of ``depth`` decoder layers: the paper prunes the output of
    layers 2, 6, 15, 19 of 32, i.e. after 3, 7, 16, 20 layers have run (sites ``llm.3``, ``llm.7``,
    ``llm.16``, ``llm.20``); elsewhere after ``(p + 1) * depth // 32`` layers (at least 1), sites
    that coincide in a shallow LLM counting once (fewer than four below 10 layers)."""
    if depth < 2:
        raise TokensieveError(f"sparsevlm prunes after a decoder layer and before another: an LLM of {depth} "
                              "layer(s) has no such site")
    return tuple(sorted({max(1, (p + 1) * depth // PAPER_DEPTH) for p in PAPER_LAYERS}))


def sparsevlm_raters(image: torch.Tensor, text: torch.Tensor,
                     text_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The text raters, from the LLM's input embeddings.

    image: ``(B, N0, d)`` the image run as the LLM received it (the projector's output); text:
    ``(B, T, d)`` every token after it (newline, question, template, answer cue), padded on the
    left where ``text_valid`` ``(B, T)`` is False. relevance ``(B, T)``: the softmax over a row's
    text of the raw dot products ``image @ text^T`` (no scaling), averaged over the image tokens;
    raters ``(B, T)`` bool: relevance strictly above the row's mean over its text. The released
    code thresholds at the mean over the whole batch, which is the row's at its batch of 1; with
    one text token the relevance is 1 = the mean and there is no rater.
    Returns ``(relevance, raters)``.
    """
    if text_valid is None:
        text_valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    scores = (image @ text.transpose(1, 2)).masked_fill(~text_valid[:, None, :], -torch.inf)  # (B, N0, T)
    relevance = scores.softmax(2).mean(1)
    threshold = torch.stack([row[ok].mean() for row, ok in zip(relevance, text_valid)])
    return relevance, (relevance > threshold[:, None]) & text_valid


def sparsevlm_rank(attention: torch.Tensor, raters: torch.Tensor, scale: float,
                   bias: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The tokens one pruning step keeps, for one row.

    attention: ``(T, V)`` the pruning layer's head-averaged attention probabilities from each token
    after the image run to the ``V`` image-run tokens (softmax over the whole causal row, not
    renormalised); raters: ``(T,)`` bool. relation ``(V,)``: the raters' rows averaged, each image
    token's score (NaN without a rater, as released: a mean over nothing). rank: the matrix rank
    of the ``(R, V)`` rater block in float32 (default tolerance). If ``rank == V`` all stay;
    otherwise the ``min(int(rank * scale + bias), V - 1)`` of highest score (``torch.topk``'s ties;
    possibly none).
    Returns ``(kept (k,) ascending, relation, rank)``.
    """
    block = attention[raters]  # (R, V)
    v = block.shape[1]
    rank = int(torch.linalg.matrix_rank(block.float()))
    relation = block.mean(0)
    if rank == v:
        return torch.arange(v, device=attention.device), relation, rank
    count = min(int(rank * scale + bias), v - 1)
    return relation.topk(count).indices.sort().values, relation, rank


def recycled_count(pruned: int) -> int:
    """How many of ``pruned`` tokens are recycled: the top 30%, plus one (``int(P * 0.3) + 1``)."""
    return int(pruned * 0.3) + 1


def cluster_count(recycled: int) -> int:
    """Into how many tokens ``recycled`` tokens are merged: ``int(n / 10) + 1``."""
    return int(recycled / 10) + 1


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` Euclidean distances of the rows of ``x`` ``(n, d)`` as released, ``(x_i - x_j).norm()``
    with no matmul shortcut, the same numbers bit for bit. A few rows at a time, against the rows from
    theirs on, mirrored: ``x_j - x_i`` is exactly ``-(x_i - x_j)``, so the matrix is exactly symmetric.
    No ``(n, n, d)`` difference is held (1.15 GB at n = 756, d = 512, which took 0.48 s there on 2 CPU
    cores, against 0.04 s in blocks), and half the differences are computed."""
    n, d = x.shape
    rows = max(1, DISTANCE_BLOCK // (n * d))
    dist = x.new_empty(n, n)
    for i in range(0, n, rows):
        block = (x[i:i + rows, None] - x[None, i:]).norm(dim=-1)  # (rows, n - i)
        dist[i:i + rows, i:] = block
        dist[i:, i:i + rows] = block.t()
    return dist


def dpc_knn_merge(x: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of ``x`` ``(n, d)`` into ``clusters`` tokens, each its cluster's mean.

    Distances are Euclidean over ``sqrt(d)``; a token's density is ``exp(-mean squared distance to
    its `clusters` nearest)`` (itself included) plus ``noise`` ``(n,)`` times 1e-6 (the released code
    draws it from the global RNG so that no two densities are equal); its delta is the distance to
    the nearest denser token (the whole matrix's largest distance for the densest). The centres are
    the top ``delta * density``, in that order; every token joins its nearest centre (the first on a
    tie), each centre its own. A cluster is ``sum / (count + 1e-6)``.
    Returns ``(merged (clusters, d), centres (clusters,))``, in the order of the centres; ``centres``
    indexes ``x``.
    """
    n, d = x.shape
    if noise.shape != (n,):
        raise TokensieveError(f"sparsevlm: the density noise must have one value per token ({n}), "
                              f"got shape {tuple(noise.shape)}")
    dist = pairwise_distances(x) / d ** 0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp() + noise.to(dist) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (delta * density).topk(clusters).indices
    assign = dist[centres].argmin(0)  # (n,) index into the centres
    assign[centres] = torch.arange(clusters, device=x.device)
    count = x.new_zeros(clusters).index_add_(0, assign, x.new_ones(n)) + 1e-6
    return x.new_zeros(clusters, d).index_add_(0, assign, x / count[assign][:, None]), centres


def sparsevlm_recycle(pruned: torch.Tensor, scores: torch.Tensor,
                      noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recycle the pruned tokens of one row.

    pruned: ``(P, d)`` the pruned image tokens (the pruning layer's outputs) in sequence order;
    scores: ``(P,)`` their scores; noise: ``(n,)`` the density noise, ``n = recycled_count(P)``.
    The top ``n`` by score (``torch.topk`` order, highest first: the clustering's input order) are
    merged by :func:`dpc_knn_merge` into ``cluster_count(n)`` tokens.
    Returns ``(recycled (n,) indices into the pruned, merged (C, d), centres (C,) indices into the
    pruned)``: each merged token's cluster centre.
    """
    recycled = scores.topk(recycled_count(pruned.shape[0])).indices
    merged, centres = dpc_knn_merge(pruned[recycled], cluster_count(recycled.numel()), noise)
    return recycled, merged, recycled[centres]


def sparsevlm_step(image: torch.Tensor, attention: torch.Tensor, raters: torch.Tensor, scale: float, bias: float,
                   noise: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pruning step of one row: :func:`sparsevlm_rank`, then :func:`sparsevlm_recycle` on the rest.

    image: ``(V, d)`` the image run as the pruning layer outputs it; attention: ``(T, V)`` and
    raters ``(T,)`` as :func:`sparsevlm_rank` takes them; noise: ``n -> (n,)`` the density noise of
    ``n`` recycled tokens. The new image run is ``image[kept]`` followed by ``merged``.
    Returns ``(kept (k,) ascending, merged (C, d), centres (C,))``, ``centres`` indexing the ``V``
    tokens: each merged token's cluster centre. ``C = 0`` when nothing is pruned.
    """
    kept, relation, _ = sparsevlm_rank(attention, raters, scale, bias)
    v = image.shape[0]
    if kept.numel() == v:
        return kept, image[:0], kept[:0]
    pruned = torch.ones(v, dtype=torch.bool, device=image.device)
    pruned[kept] = False
    pruned = pruned.nonzero()[:, 0]  # in sequence order
    _, merged, centres = sparsevlm_recycle(image[pruned], relation[pruned], noise(recycled_count(pruned.numel())))
    return kept, merged, pruned[centres]


@register
@dataclass
class SparseVLM(Method):
    """SparseVLM (v1): text raters, rank-adaptive counts and recycled tokens at four LLM layers.

    The budget picks the released ``(scale, bias)``: 192 -> (13.5, 0), 128 -> (9, 6), 64 -> (0.8, 0)
    (a ratio r of 576 alike). These budgets are the layer averages the authors observed, not counts:
    each prompt and step keeps ``min(int(rank * scale + bias), V - 1)`` (plus the recycled tokens),
    so every stage's budget is 1.0, only a cap. Any other budget needs ``scale`` and ``bias``.

    layers: the pruning sites (default: the paper's ``llm.3, llm.7, llm.16, llm.20`` of 32,
    :func:`sparsevlm_layers` for other depths). positions: ``"renumbered"`` (the paper's: gap-free
    after each step) or ``"original"`` (ours). Signals: ``post_image_attention`` ``(B, T, N)``,
    ``input_image_embeddings`` ``(B, N0, d)`` and the question signal ``input_embeddings``
    ``(B, T, d)``. Ours, beyond the batch-1 release: rows are independent (the rater threshold is
    each row's mean, the released one the batch's, equal at batch 1), and the density noise comes
    from the row's seeded generator instead of the global RNG. A row without a rater (one token
    after the image) keeps its image run whole: the released scores are then NaN and what it keeps
    an artifact of ``torch.topk`` on NaN.
    """

    name = "sparsevlm"
    paper = ("Zhang, Fan, Ma, Zheng, Huang, Cheng, Kuang, Gudovskiy, Okuno, Nakata, Keutzer, Zhang. SparseVLM: "
             "Visual Token Sparsification for Efficient Vision-Language Model Inference. ICML 2025. arXiv:2410.04417")
    stages = ("llm",)
    default_site = "llm"  # placed by its layers, not one site
    signals = ("post_image_attention", "input_image_embeddings")
    makes_extra_tokens = True

    scale: float | None = None
    bias: float | None = None
    layers: tuple[int, ...] | None = None
    positions: str = "renumbered"

    def __post_init__(self):
        checked_positions(self.name, self.positions)
        for knob in ("scale", "bias"):
            value = getattr(self, knob)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise TokensieveError(f"sparsevlm: {knob}={value!r} must be a number >= 0")
        self.layers = checked_layers(self.name, self.layers)

    @property
    def count_per_row(self) -> bool:
        return True

    @property
    def renumbers_positions(self) -> bool:
        return self.positions == "renumbered"

    def for_budget(self, budget: Budget) -> SparseVLM:
        """This method with the released ``(scale, bias)`` of ``budget`` (192, 128 or 64 tokens, or a
        ratio of 576 within a percent of one: 0.33, 0.22 and 0.11 name them too), where they were not
        given."""
        if self.scale is not None and self.bias is not None:
            return self
        tokens = budget.count
        if budget.ratio is not None:  # the nearest setting, if the ratio is within a percent of it
            near = min(PAPER_SETTINGS, key=lambda k: abs(k / PAPER_IMAGE_TOKENS - budget.ratio))
            tokens = near if abs(near / PAPER_IMAGE_TOKENS - budget.ratio) <= 0.01 else None
        if tokens not in PAPER_SETTINGS:
            settings = ", ".join(f"{k} -> scale {s:g}, bias {b:g}" for k, (s, b) in PAPER_SETTINGS.items())
            raise TokensieveError(f"sparsevlm's count adapts to each prompt; its budget picks the paper's setting "
                                  f"({settings}; or a ratio of 576): for budget {budget} give scale= and bias=")
        scale, bias = PAPER_SETTINGS[tokens]
        return dataclasses.replace(self, scale=scale if self.scale is None else self.scale,
                                   bias=bias if self.bias is None else self.bias)

    def schedule(self, site: str, budget: Budget, depth: int | None = None) -> list[tuple[str, Budget]]:
        layers = stage_layers(self.name, self.layers, sparsevlm_layers, site, depth)
        return [(f"llm.{k}", Budget(ratio=1.0)) for k in layers]

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if site == "llm.0":
            raise TokensieveError("sparsevlm scores with the attention of the layer before its site (llm.k, "
                                  "k >= 1), not at llm.0")

    def select(self, inputs: SiteInputs) -> Selection:
        if self.scale is None or self.bias is None:
            raise TokensieveError("sparsevlm needs its count setting: a budget of 192, 128 or 64 (for_budget), "
                                  "or scale= and bias=")
        tokens = inputs.tokens
        b, n, d = tokens.shape
        attention = inputs.signal("post_image_attention")  # (B, T, N)
        _, text_valid = inputs.question()
        _, raters = sparsevlm_raters(inputs.signal("input_image_embeddings"),
                                     inputs.question_signal("input_embeddings"), text_valid)
        valid = inputs.valid if inputs.valid is not None else torch.ones(b, n, dtype=torch.bool, device=tokens.device)
        kept_rows, made_rows, centre_rows = [], [], []
        for r in range(b):
            run = valid[r].nonzero()[:, 0]  # the row's image run, in order (kept, then recycled)
            if not bool(raters[r].any()):
                kept_rows.append(run)
                made_rows.append(tokens.new_zeros(0, d))
                centre_rows.append(run[:0])
                continue
            kept, merged, centres = sparsevlm_step(tokens[r, run], attention[r][:, run], raters[r], self.scale,
                                                   self.bias, partial(torch.rand, generator=inputs.generators()[r]))
            kept_rows.append(run[kept])
            made_rows.append(merged)
            centre_rows.append(run[centres])
        return _assemble(kept_rows, made_rows, centre_rows, n)


def _assemble(kept_rows: list[torch.Tensor], made_rows: list[torch.Tensor], centre_rows: list[torch.Tensor],
              n: int) -> Selection:
    """One selection from each row's kept indices ``(k_r,)`` into ``n`` tokens, made tokens ``(C_r, d)``
    and their centres ``(C_r,)`` (indices into the ``n``: ``extra_at``). A row keeping fewer than the
    most is padded with tokens it drops (sorted in among its kept ones, ``valid`` False), one making
    fewer with zeros at its first token (``extra_valid`` False)."""
    width = max(k.numel() for k in kept_rows)
    indices, valid = [], []
    for kept in kept_rows:
        taken = torch.zeros(n, dtype=torch.bool, device=kept.device)
        taken[kept] = True
        pad = (~taken).nonzero()[:width - kept.numel(), 0]
        row = torch.cat([kept, pad]).sort()
        indices.append(row.values)
        valid.append(taken[row.values])
    made = max(m.shape[0] for m in made_rows)
    extra = extra_valid = extra_at = None
    if made:
        extra = torch.stack([torch.cat([m, m.new_zeros(made - m.shape[0], m.shape[1])]) for m in made_rows])
        extra_valid = torch.stack([torch.arange(made, device=extra.device) < m.shape[0] for m in made_rows])
        extra_at = torch.stack([torch.cat([c, c.new_zeros(made - c.shape[0])]) for c in centre_rows])
    return Selection(torch.stack(indices), valid=torch.stack(valid), extra=extra, extra_valid=extra_valid,
                     extra_at=extra_at)
