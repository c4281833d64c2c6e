"""The paired comparison behind "higher than every training-free method": sign test and differences."""

from __future__ import annotations

from math import comb

import pytest

from tokensieve.evaluate.paired import add_paired_at_cost
from tokensieve.evaluate.paired import paired_difference, sign_test_p
from tokensieve.evaluate.report import write_report


def test_sign_test_matches_the_binomial_tails():
    assert sign_test_p(8, 0) == pytest.approx(2 / 2 ** 8)
    assert sign_test_p(0, 8) == sign_test_p(8, 0)  # two-sided: symmetric
    assert sign_test_p(7, 3) == pytest.approx(2 * sum(comb(10, i) for i in range(4)) / 2 ** 10)
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(0, 0) == 1.0


def test_a_difference_is_counted_on_the_items_where_the_rows_disagree():
    ours, theirs = [1, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    assert paired_difference(ours, theirs) == {"difference": round(1 / 6, 4), "better": 2, "worse": 1,
                                               "p_value": 1.0}
    soft = paired_difference([1.0, 0.3], [0.6, 0.3])  # VQA soft scores: a partial win is still a win
    assert (soft["better"], soft["worse"], soft["difference"]) == (1, 0, 0.2)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same non-zero number of items"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="same non-zero number of items"):
        paired_difference([], [])


def test_the_report_lists_each_paired_comparison(tmp_path):
    flops = {"vision": 1, "projector": 1, "llm": 1, "lm_head": 1, "total": 4}
    base = {"site": "projector", "visual_tokens_kept": 8, "per_family": {"count": 0.5}, "flops": flops,
            "flops_ratio": 1.0, "tokens_per_llm_layer": [30, 30], "n": 40, "accuracy_ci95": [0.45, 0.95]}
    paired = {"against": "fastv@llm.2", "accuracy": 0.6, "difference": 0.25, "better": 30, "worse": 5,
              "p_value": 0.0001}
    rows = [{**base, "method": "none", "site": None, "budget": 1.0, "accuracy": 0.9},
            {**base, "method": "fastv", "budget": "8", "accuracy": 0.6},
            {**base, "method": "two_stage", "budget": "8", "accuracy": 0.85, "paired": [paired]}]
    md = write_report(rows, {}, tmp_path)["report.md"].read_text()
    section = md.split("## The two-stage pruner against each method at its budget", 1)[1]
    assert "| 8 | 0.850 | fastv@llm.2 | 0.600 | +0.250 | 30 | 5 | 0.0001 |" in section
    assert "against each method" not in write_report(rows[:2], {}, tmp_path / "none")["report.md"].read_text()


def test_each_method_meets_the_costliest_two_stage_row_that_costs_no_more():
    def row(method, budget, total, accuracy):
        return {"method": method, "budget": budget, "flops": {"total": total}, "flops_ratio": total / 10,
                "accuracy": accuracy}

    rows = [row("none", 1.0, 10, 1.0), row("two_stage", "0.33", 5, 1.0), row("two_stage", "0.11", 3, 0.5),
            row("fastv", "0.11", 6, 0.75), row("divprune", "0.33", 4, 0.5), row("tome", "0.11", 2, 0.25)]
    scores = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1], [1, 0, 0, 0]]
    add_paired_at_cost(rows, scores)
    fastv, divprune, tome = rows[3:]
    assert fastv["two_stage_at_cost"] == {"budget": "0.33", "flops_ratio": 0.5, "accuracy": 1.0,
                                          **paired_difference(scores[1], scores[3])}
    assert divprune["two_stage_at_cost"]["budget"] == "0.11"  # the 0.33 row costs more than divprune's
    assert divprune["two_stage_at_cost"]["better"] == 1 and divprune["two_stage_at_cost"]["worse"] == 1
    assert tome["two_stage_at_cost"] is None  # cheaper than every two-stage row
    assert all("two_stage_at_cost" not in r for r in rows[:3])


def test_the_report_lists_each_method_against_the_two_stage_row_at_its_cost(tmp_path):
    flops = {"vision": 1, "projector": 1, "llm": 1, "lm_head": 1, "total": 4}
    base = {"site": "llm.2", "visual_tokens_kept": 8, "per_family": {"count": 0.5}, "flops": flops,
            "tokens_per_llm_layer": [30, 30], "n": 40, "accuracy_ci95": [0.45, 1.0]}
    at_cost = {"budget": "0.33", "flops_ratio": 0.45, "accuracy": 1.0, "difference": 0.034, "better": 17,
               "worse": 0, "p_value": 1.53e-05}
    rows = [{**base, "method": "none", "site": None, "budget": 1.0, "accuracy": 1.0, "flops_ratio": 1.0},
            {**base, "method": "fastv", "budget": "0.11", "accuracy": 0.966, "flops_ratio": 0.525,
             "two_stage_at_cost": at_cost},
            {**base, "method": "tome", "site": "vision.1", "budget": "0.11", "accuracy": 0.6, "flops_ratio": 0.24,
             "two_stage_at_cost": None}]
    md = write_report(rows, {}, tmp_path)["report.md"].read_text()
    section = md.split("## The two-stage pruner against each method at no more prefill cost", 1)[1]
    assert "| fastv@llm.2 | 0.11 | 0.525 | 0.966 | 0.33 | 0.450 | 1.000 | +0.034 | 17 | 0 | 1.53e-05 |" in section
    assert "| tome@vision.1 | 0.11 | 0.240 | 0.600 | — | — | — | — | — | — | — |" in section
    assert "no more prefill cost" not in write_report(rows[:1], {}, tmp_path / "none")["report.md"].read_text()
