"""The object oracle's row of an evaluation on the synthetic set: only tokens on objects, one per
object before a second, at a budget (:func:`tokensieve.data.synthetic_eval.object_oracle`).

LLaVA: every scene has the model's one patch grid, so the budget is one count, chosen between the
projector and the LLM. Qwen-VL: each scene has its own size (a scene patch is one merged token),
so the budget is resolved per image, a ratio of its tokens or a count of every image's, as the
Qwen methods' budgets are at ``llm.0``, and the objects' cells are numbered on that image's grid.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from tokensieve.backbones.load import is_qwen
from tokensieve.data.synthetic import Sample
from tokensieve.data.synthetic_eval import KeptFn, object_oracle, scene_spec_for
from tokensieve.data.vqa_files import VQAItem
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.costs import cost_fields
from tokensieve.evaluate.eval_data import EvalData
from tokensieve.evaluate.flops import TokenCounts, token_counts
from tokensieve.evaluate.item_costs import mean_number
from tokensieve.evaluate.scorer import Scorer
from tokensieve.method import Budget


def oracle_site(backbone) -> str:
    """Where the oracle's choice stands: before the LLM, the site a method there would take."""
    return "llm.0" if is_qwen(backbone) else "projector"


def per_image_oracle(budget: str) -> KeptFn:
    """The object oracle on a scene of any size: ``budget`` resolved over the scene's tokens, its objects'
    cells row-major over the scene's own columns. A count above a scene's tokens is refused in one line."""
    parsed = Budget.parse(budget)

    def kept(scene: Sample):
        n = scene.grid[0] * scene.grid[1]
        if parsed.count is not None and parsed.count > n:
            raise TokensieveError(f"object_oracle:{budget}: item {scene.index} gives {n} visual tokens, fewer than "
                                  "the budget; give a smaller count or a ratio")
        return object_oracle(parsed.resolve(n), scene.grid[1])(scene)

    return kept


def check_oracle_budgets(backbone, data: EvalData, budgets: list[str]) -> None:
    """Refuse, before any model work, an oracle budget some scene cannot take (Qwen-VL: a count above
    the tokens of the smallest image; LLaVA: above the patches)."""
    for budget in budgets:
        if is_qwen(backbone):
            smallest = min(data.scenes.values(), key=lambda s: s.grid[0] * s.grid[1])
            per_image_oracle(budget)(smallest)
        else:
            Budget.parse(budget).resolve(backbone.n_patches, "the object oracle")


def oracle_row(backbone, data: EvalData, budget: str, costs, baseline: dict, scored: Scorer,
               timing: Callable[[KeptFn], dict], examples: list[VQAItem]) -> dict:
    """The object oracle's row at ``budget``; ``costs`` the evaluation's cost fields (:class:`LlavaCosts`
    or :class:`QwenCosts`), ``baseline`` its unpruned row's, ``timing`` the timing fields with a choice."""
    if is_qwen(backbone):
        by_scene = per_image_oracle(budget)
    else:
        by_scene = object_oracle(Budget.parse(budget).resolve(backbone.n_patches, "the object oracle"),
                                 scene_spec_for(backbone).grid)

    def choose(item: VQAItem):
        return by_scene(data.scenes[item.question_id])

    result = scored(f"object_oracle:{budget}", choose)
    per_item = [len(choose(i)) for i in data.items]
    if is_qwen(backbone):
        kept, cost = mean_number(per_item), costs.of_llm_inputs(per_item)
    else:
        kept = round(statistics.mean(per_item))
        full = token_counts(backbone, costs.text_tokens)
        counts = TokenCounts(full.vision_tokens, full.projector_tokens,
                             [costs.text_tokens + kept] * len(full.llm_tokens))
        cost = cost_fields(backbone, costs.text_tokens, counts=counts)
    site = oracle_site(backbone)
    row = {"method": "object_oracle", "site": site, "budget": budget, "visual_tokens_kept": kept, **result,
           **cost, "flops_ratio": round(cost["flops"]["total"] / baseline["flops"]["total"], 4),
           **timing(choose)}
    if examples:
        row["kept_tokens"] = {"ids": [i.question_id for i in examples],
                              "stages": {f"object_oracle@{site}:{budget}": [choose(i).tolist() for i in examples]}}
    return row
