"""The spread of a measured figure: a 95% interval for an accuracy, quartiles for a timing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...: two-sided 95%


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(lo, hi)`` of a proportion ``accuracy`` measured on ``n`` items.

    Unlike accuracy +- 1.96 standard errors it stays inside [0, 1] and is not zero wide at 0 or 1
    (a perfect score on 100 items is [0.963, 1]). For VQA soft scores (a mean of values in
    [0, 1], not of 0/1 answers) it is an approximation: a mean of fractions varies less.
    """
    if n <= 0:
        raise ValueError(f"an interval needs at least one item, got n={n}")
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(scores: Sequence[float]) -> dict:
    """``{"n", "accuracy_ci95": [lo, hi]}`` of the mean of ``scores`` (one per item), to 4 decimals."""
    lo, hi = wilson_interval(sum(scores) / len(scores), len(scores))
    return {"n": len(scores), "accuracy_ci95": [round(lo, 4), round(hi, 4)]}


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``values``, linearly interpolated (one value: all three equal it)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3
