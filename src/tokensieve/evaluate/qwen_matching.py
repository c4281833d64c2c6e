"""Budgets that put methods at equal cost on Qwen-VL (``eval --match``; :mod:`.matching` for LLaVA).

Each image gives its own visual tokens, so a budget is planned per image, as the Qwen session
resolves it: a method's budget is a share of each image's tokens (in steps of 0.001), its stages
are planned on every image of the evaluation, and the planned cost is the mean over the items,
the same mean the measured rows report (:mod:`.qwen_costs`): visual tokens averaged over the LLM's
layers, or prefill FLOPs (the tower, the patch merger and ``lm_head`` do not depend on the budget,
so only the decoder layers are planned; the rest is the unpruned row's).
"""

from __future__ import annotations

import statistics
from collections import Counter

from tokensieve.backbones.base import Site
from tokensieve.evaluate.flops import decoder_layer_flops
from tokensieve.evaluate.matching import SHARES, kept_as_planned, nearest_budget
from tokensieve.evaluate.qwen_costs import QwenCosts


def llm_positions(kept: dict[Site, int], visual: int, text_tokens: int, depth: int) -> list[int]:
    """Positions entering each of ``depth`` decoder layers for an image of ``visual`` tokens whose
    stages keep ``kept`` (``{site: tokens}``; ``projector`` and ``llm.0`` both from layer 0)."""
    counts = []
    for k in range(depth):
        for site in sorted(kept, key=lambda s: s.order):
            if (site.before_llm and k == 0) or site == Site("llm", k):
                visual = kept[site]
        counts.append(text_tokens + visual)
    return counts


class QwenPlan:
    """Planned costs over the items of one evaluation on a Qwen-VL model: ``costs`` its cost fields,
    ``baseline`` its unpruned row's."""

    def __init__(self, backbone, costs: QwenCosts, baseline: dict):
        self.text_config, self.depth, self.text_tokens = backbone.config.text_config, costs.depth, costs.text_tokens
        self.images = Counter(costs.counts)  # visual tokens -> items with that many
        self.items = len(costs.counts)
        self.unplanned = baseline["flops"]["total"] - baseline["flops"]["llm"]  # what no budget changes

    def cost(self, stages, by: str) -> float:
        """Mean visual tokens over the LLM's layers (``by="tokens"``) or mean prefill FLOPs (``"flops"``)."""
        tokens = flops = 0.0
        for visual, items in self.images.items():
            llm = llm_positions(kept_as_planned(stages, visual, False), visual, self.text_tokens, self.depth)
            if by == "tokens":
                tokens += items * (statistics.mean(llm) - self.text_tokens)
            else:
                flops += items * sum(decoder_layer_flops(self.text_config, n) for n in llm)
        return tokens / self.items if by == "tokens" else self.unplanned + flops / self.items

    def matched_budget(self, method, site: str | None, target: float, by: str) -> tuple[float, float]:
        """``(share, cost)``: the share of each image's tokens whose planned cost is nearest ``target``."""
        return nearest_budget(method, site, target, SHARES, self.depth, lambda stages: self.cost(stages, by))
