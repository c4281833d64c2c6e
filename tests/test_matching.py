"""Budgets matched at equal cost (`eval --match`): planned from the budgets, checked against runs."""

from __future__ import annotations

import json

import pytest

from tokensieve.attach import attach, make_stages
from tokensieve.backbones.base import Site
from tokensieve.backbones.llava_prompt import encode
from tokensieve.cli import main
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.costs import cost_fields
from tokensieve.evaluate.matching import matched_budget, planned_cost, planned_kept

TEXT_TOKENS = 12



@pytest.mark.parametrize("stages", [
    [("random", "projector", 20)],
    [("random", "llm.0", 0.25)],
    [("fastv", "llm.1", 10)],
    [("random", "vision.1", 40), ("random", "llm.0", 20), ("random", "llm.2", 8)],
    [("tome", "vision.0", 16)],
], ids=["projector", "llm.0", "llm.1", "three-sites", "tome-in-blocks"])
def test_the_plan_is_what_a_run_keeps_and_costs(backbone, tiny_samples, stages):
    handle = attach(backbone, stages)
    try:
        backbone.forward(**encode(backbone.processor, tiny_samples))
        measured = cost_fields(backbone, TEXT_TOKENS, handle)
    finally:
        handle.detach()
    planned = planned_kept(backbone, handle.stages)
    assert [planned[s] for s in planned] == [round(handle.mean_kept(str(st))) for st in handle.stages]
    assert planned_cost(backbone, handle.stages, TEXT_TOKENS, "tokens") == pytest.approx(measured["visual_tokens_mean_llm"], abs=0.01)
    assert planned_cost(backbone, handle.stages, TEXT_TOKENS, "flops") == measured["flops"]["total"]


@pytest.mark.parametrize("by", ["tokens", "flops"])
def test_the_matched_budget_is_the_nearest_any_budget_can_get(backbone, by):
    target = planned_cost(backbone, make_stages("random", 40, "projector"), TEXT_TOKENS, by)
    count, cost = matched_budget(backbone, "fastv", "llm.1", target, by, TEXT_TOKENS)
    costs = {c: planned_cost(backbone, make_stages("fastv", c, "llm.1"), TEXT_TOKENS, by) for c in range(1, 65)}
    assert cost == costs[count]
    assert all(abs(cost - target) <= abs(other - target) for other in costs.values())
    # FastV keeps all 64 tokens in layer 0 of 3, so it must keep fewer than 40 afterwards to cost the
    # same: (64 + 2 x 28) / 3 = 40 tokens on average.
    assert count == 28 if by == "tokens" else count < 40
    assert matched_budget(backbone, "random", "projector", target, by, TEXT_TOKENS) == (40, target)


def test_a_count_per_row_cannot_be_planned(backbone):
    stages = make_stages({"name": "layer_pruner", "threshold": 0.5}, 1.0, "llm.1")
    with pytest.raises(TokensieveError, match="keeps a count per row, which cannot be planned"):
        planned_kept(backbone, stages)


def test_eval_matches_methods_at_equal_mean_tokens_in_the_llm(tiny_llava_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random,fastv", "--budget", "48",
                 "--match", "tokens", "--samples", "4", "--timing-samples", "0", "--json",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    random_row, fastv_row = rows[1:]
    assert random_row["budget"] == 48 and random_row["matched"] == {"by": "tokens", "to": "48", "target": 48,
                                                                  "planned": 48}
    # FastV at its site llm.2 of 3 layers: (64 + 64 + 16) / 3 = 48 visual tokens on average.
    assert (fastv_row["site"], fastv_row["budget"], fastv_row["visual_tokens_mean_llm"]) == ("llm.2", 16, 48)
    assert fastv_row["matched"]["planned"] == 48
    report = (tmp_path / "report.md").read_text()
    assert "## Budgets matched at equal cost" in report and "| fastv | llm.2 | 48 | 16 |" in report


def test_matching_by_flops_needs_shares(tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random", "--budget", "16",
                 "--match", "flops", "--samples", "4"]) == 2
    assert "matching by flops needs each --budget as a share" in capsys.readouterr().err


def test_a_method_whose_budget_is_a_share_is_matched_by_its_share(backbone):
    """PyramidDrop's budget is lambda: at layers 1 and 2 of 3, (64 + int(64 l) + int(64 l^2)) / 3 ~ 37 near l = 0.5."""
    method = {"name": "pyramiddrop", "layers": (1, 2)}
    share, cost = matched_budget(backbone, method, None, 37.0, "tokens", TEXT_TOKENS)
    assert isinstance(share, float) and 0.4 < share < 0.5 and abs(cost - 37.0) < 0.5
    assert planned_cost(backbone, make_stages(method, share, None, depth=3), TEXT_TOKENS, "tokens") == cost


def test_a_method_that_cannot_be_planned_is_refused_before_any_scoring(tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "sparsevlm", "--budget", "16",
                 "--match", "tokens", "--samples", "4"]) == 2
    err = capsys.readouterr().err
    assert "sparsevlm cannot be matched at equal cost" in err and "none " not in err


def test_the_plan_follows_a_method_s_own_count_and_refusals(backbone):
    """DART keeps 4 + 8 x ((keep - 4) // 8) and refuses fewer than its 4 image pivots."""
    assert planned_kept(backbone, make_stages("dart", 16, "llm.1"))[Site.parse("llm.1")] == 12
    with pytest.raises(TokensieveError, match="keeps its 4 image pivots"):
        planned_kept(backbone, make_stages("dart", 2, "llm.1"))
    count, _ = matched_budget(backbone, "dart", "llm.1", 22.0, "tokens", TEXT_TOKENS)
    assert count >= 4
