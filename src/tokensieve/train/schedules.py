"""Schedules over training: the Gumbel temperature, loss warm-up and the target-ratio curriculum.

Each is a pure function of the step; ``progress`` through a phase is ``step / (fraction * total_steps)``
clipped to ``[0, 1]``, so the value reached at the end of the phase is held for the rest of training.
"""

from __future__ import annotations

import math

from tokensieve.errors import TokensieveError

TEMPERATURE_KINDS = ("exponential", "linear")
LR_SCHEDULES = ("constant", "cosine")


def _check_fraction(name: str, fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise TokensieveError(f"{name} {fraction} is not in [0, 1]")


def _progress(step: int, total_steps: int, fraction: float, name: str) -> float:
    """How far ``step`` is through the first ``fraction`` of ``total_steps``, in ``[0, 1]`` (1 when the phase is empty)."""
    if total_steps < 1:
        raise TokensieveError(f"total_steps must be at least 1, got {total_steps}")
    if step < 0:
        raise TokensieveError(f"step must be >= 0, got {step}")
    _check_fraction(name, fraction)
    phase = fraction * total_steps
    return 1.0 if phase == 0 else min(step / phase, 1.0)


def temperature_at(step: int, total_steps: int, start: float = 5.0, end: float = 0.1, kind: str = "exponential",
                   anneal_fraction: float = 1.0, floor: float = 0.1) -> float:
    """Gumbel-softmax temperature at ``step``: from ``start`` to ``end`` over the first ``anneal_fraction``.

    ``exponential`` moves geometrically (``start * (end / start) ** progress``), ``linear`` in equal steps;
    the temperature is then held at ``end`` and never goes below ``floor``.
    """
    if start <= 0 or end <= 0:
        raise TokensieveError(f"temperatures must be > 0, got start={start}, end={end}")
    if kind not in TEMPERATURE_KINDS:
        raise TokensieveError(f"unknown temperature schedule {kind!r}; choose one of {', '.join(TEMPERATURE_KINDS)}")
    p = _progress(step, total_steps, anneal_fraction, "anneal_fraction")
    if kind == "exponential":
        value = start * (end / start) ** p
    else:
        value = start + p * (end - start)
    return max(value, floor)


def warmup_weight_at(step: int, total_steps: int, weight: float, warmup_fraction: float) -> float:
    """A loss weight that is 0 during the first ``warmup_fraction`` of training and ``weight`` after."""
    in_warmup = _progress(step, total_steps, warmup_fraction, "warmup_fraction") < 1
    return 0.0 if in_warmup else weight


def target_ratio_at(step: int, total_steps: int, target: float, curriculum_fraction: float,
                    start: float = 1.0) -> float:
    """Keep-ratio target at ``step``: linear from ``start`` down to ``target`` over the first ``curriculum_fraction``."""
    for name, ratio in (("target", target), ("start", start)):
        if not 0 < ratio <= 1:
            raise TokensieveError(f"{name} keep ratio {ratio} is not in (0, 1]")
    p = _progress(step, total_steps, curriculum_fraction, "curriculum_fraction")
    return start + p * (target - start)


def lr_factor_at(step: int, total_steps: int, kind: str = "constant", floor: float = 0.1) -> float:
    """Learning-rate multiplier at ``step``: 1 throughout (``constant``), or half a cosine from
    1 down to ``floor`` over training (``cosine``: late steps, at a low Gumbel temperature, move
    the parts less, so what they learned at the small budgets is not undone)."""
    if kind not in LR_SCHEDULES:
        raise TokensieveError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= floor <= 1:
        raise TokensieveError(f"learning-rate floor {floor} is not in [0, 1]")
    if kind == "constant":
        return 1.0
    p = _progress(step, total_steps, 1.0, "lr")
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
