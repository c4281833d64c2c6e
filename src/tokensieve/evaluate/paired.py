"""Paired comparison of two evaluation rows scored on the same items.

Every row of ``tokensieve eval`` answers the same questions, so whether one method is higher
than another is a question about the items where they disagree, not about two independent
accuracies: an exact two-sided sign test on those items (McNemar's test for 0/1 scores).
"""

from __future__ import annotations

from math import comb
from typing import Sequence


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided p-value that ``better`` and ``worse`` (counts of items where one row
    scored higher and where it scored lower) came from a fair coin; 1.0 when both are 0."""
    n, low = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(low + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(scores: Sequence[float], other: Sequence[float]) -> dict:
    """``{"difference", "better", "worse", "p_value"}`` of per-item ``scores`` against ``other``
    (same items, same order): mean difference, items scored higher and lower, sign-test p."""
    if len(scores) != len(other) or not scores:
        raise ValueError(f"paired scores need the same non-zero number of items, got {len(scores)} and {len(other)}")
    better = sum(a > b for a, b in zip(scores, other))
    worse = sum(a < b for a, b in zip(scores, other))
    difference = sum(a - b for a, b in zip(scores, other)) / len(scores)
    return {"difference": round(difference, 4), "better": better, "worse": worse,
            "p_value": float(f"{sign_test_p(better, worse):.3g}")}


def _pairing_budget(row: dict):
    """The budget a row is compared at: the one it was matched to, else its own."""
    return row.get("matched", {}).get("to", row["budget"])


def add_paired(rows: list[dict], item_scores: list[list[float]]) -> None:
    """Give each ``two_stage`` row ``paired``: its :func:`paired_difference` against every other
    pruned row at the same budget (``against``: that row's method and site)."""
    for row, scores in zip(rows, item_scores):
        if row["method"] != "two_stage":
            continue
        row["paired"] = [{"against": f"{other['method']}@{other['site']}", "accuracy": other["accuracy"],
                          **paired_difference(scores, other_scores)}
                         for other, other_scores in zip(rows, item_scores)
                         if other["method"] not in ("none", "two_stage")
                         and _pairing_budget(other) == _pairing_budget(row)]


def add_paired_at_cost(rows: list[dict], item_scores: list[list[float]]) -> None:
    """Give every other pruned row ``two_stage_at_cost`` when there are ``two_stage`` rows: the
    :func:`paired_difference` (the two-stage row's scores against this row's) of the most
    expensive two-stage row whose prefill FLOPs are no more than this row's, with that row's
    ``budget``, ``flops_ratio`` and ``accuracy``; None when every two-stage row costs more.
    Budgets count tokens at different places (entering the LLM, or after an LLM layer), so
    equal cost is the other fair comparison."""
    learned = [(row, scores) for row, scores in zip(rows, item_scores) if row["method"] == "two_stage"]
    if not learned:
        return
    for row, scores in zip(rows, item_scores):
        if row["method"] in ("none", "two_stage"):
            continue
        affordable = [(r, s) for r, s in learned if r["flops"]["total"] <= row["flops"]["total"]]
        if not affordable:
            row["two_stage_at_cost"] = None
            continue
        best, best_scores = max(affordable, key=lambda pair: pair[0]["flops"]["total"])
        row["two_stage_at_cost"] = {"budget": best["budget"], "flops_ratio": best["flops_ratio"],
                                    "accuracy": best["accuracy"], **paired_difference(best_scores, scores)}
