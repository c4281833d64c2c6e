"""Budgets that put methods at equal cost.

Papers with per-layer schedules (PyramidDrop, SparseVLM) call the visual tokens averaged over
the LLM's decoder layers their budget; a method dropping tokens at ``llm.2`` and one dropping
them before the LLM keep the same count yet cost differently. To compare them fairly, each
method's budget is chosen so that its *planned* cost — from its stages' budgets alone, before
any model work — equals a target: the same visual tokens averaged over the LLM's layers
(``by="tokens"``) or the same prefill FLOPs (``by="flops"``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from tokensieve.attach import make_stages
from tokensieve.backbones.base import Site
from tokensieve.backbones.stage_plan import merges_in_blocks, stage_inputs
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.flops import prefill_flops, token_counts
from tokensieve.methods import create_method

MATCH_BY = ("tokens", "flops")
SHARES = [i / 1000 for i in range(1, 1001)]  # budgets as shares, in steps of 0.001


def planned_kept(backbone, stages) -> dict[Site, int]:
    """``{site: visual tokens kept}`` of ``stages`` (a list of :class:`tokensieve.attach.Stage`)
    as their budgets say, CLS excluded before the LLM as in :func:`token_counts`."""
    return kept_as_planned(stages, backbone.n_patches, backbone.keeps_cls)


def kept_as_planned(stages, n_patches: int, keeps_cls: bool) -> dict[Site, int]:
    """:func:`planned_kept` for an image of ``n_patches`` tokens before the LLM (``keeps_cls``: the LLM
    also receives CLS)."""
    by_site = {Site.parse(st.site): st for st in stages}
    kept = {}
    for site, st, n in stage_inputs(by_site, n_patches, keeps_cls):
        if st.method.count_per_row:
            raise TokensieveError(f"{st} keeps a count per row, which cannot be planned; give it a fixed budget "
                                  "to match it at equal cost")
        keep = st.budget.resolve(n, str(site))
        st.method.check(n, keep, str(site))  # a budget it refuses (below DART's pivots) cannot be planned
        kept[site] = st.method.kept_count(n, keep)
    return kept


def planned_cost(backbone, stages, text_tokens: int, by: str) -> float:
    """Visual tokens averaged over the LLM's layers (``by="tokens"``), or the total prefill FLOPs
    (``by="flops"``), of one prefill with ``text_tokens`` non-image tokens under ``stages``."""
    merging = {Site.parse(st.site): st.method for st in stages if merges_in_blocks(st.method)}
    counts = token_counts(backbone, text_tokens, kept=planned_kept(backbone, stages), merging=merging)
    if by == "tokens":
        return statistics.mean(counts.llm_tokens) - text_tokens
    return float(prefill_flops(backbone.config, *counts)["total"])


def matched_budget(backbone, method, site: str | None, target: float, by: str,
                   text_tokens: int) -> tuple[int | float, float]:
    """``(budget, cost)``: the budget of ``method`` (at ``site``, default its own) whose planned
    cost is nearest ``target`` (the smaller on a tie), and that cost. The budget is a token count,
    or, for a method whose budget is a share (``budget_is_share``: PyramidDrop's lambda), a share
    in steps of 0.001."""
    if by not in MATCH_BY:
        raise TokensieveError(f"cannot match by {by!r}; expected one of {', '.join(MATCH_BY)}")
    share = create_method(method).budget_is_share
    candidates = SHARES if share else range(1, backbone.n_visual_tokens + 1)
    return nearest_budget(method, site, target, candidates, len(backbone.llm_layers),
                          lambda stages: planned_cost(backbone, stages, text_tokens, by))


def nearest_budget(method, site: str | None, target: float, candidates, depth: int,
                   cost_of: Callable[[list], float]) -> tuple[int | float, float]:
    """``(budget, cost)``: the one of ``candidates`` whose stages' ``cost_of`` is nearest ``target``
    (the smaller on a tie), for ``method`` at ``site`` in an LLM of ``depth`` decoder layers."""
    best, why = None, None
    for budget in candidates:
        try:
            stages = make_stages(method, budget, site, depth)
            cost = cost_of(stages)
        except TokensieveError as err:  # a budget it cannot run at (more than the site holds, ...)
            why = err
            continue
        if best is None or abs(cost - target) < abs(best[1] - target):
            best = (budget, cost)
    if best is None:
        name = method if isinstance(method, str) else create_method(method).name
        raise TokensieveError(f"{name} cannot be matched at equal cost: no budget of it can be planned ({why})")
    return best
