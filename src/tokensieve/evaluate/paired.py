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
