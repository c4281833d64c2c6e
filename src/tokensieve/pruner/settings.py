"""The settings of a trained two-stage pruner: its merger, its layer pruner heads and its
discriminator (the ``merger``, ``pruner`` and ``discriminator`` sections of a run's ``config.yaml``).

Inference needs only these; a training run's config (:class:`tokensieve.train.two_stage_config.TwoStageConfig`)
extends :class:`PrunerSettings` with the training sections, so one YAML file serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokensieve.errors import TokensieveError


def at_least(section: object, minimum: float, *names: str) -> None:
    """Refuse a field of ``section`` below ``minimum`` (a field left None is not checked)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise TokensieveError(f"{name} {value} must be >= {minimum}")


def positive(section: object, *names: str) -> None:
    """Refuse a field of ``section`` that is not above 0."""
    for name in names:
        if getattr(section, name) <= 0:
            raise TokensieveError(f"{name} {getattr(section, name)} must be > 0")


def fraction(section: object, *names: str) -> None:
    """Refuse a field of ``section`` outside ``[0, 1]``."""
    for name in names:
        if not 0 <= getattr(section, name) <= 1:
            raise TokensieveError(f"{name} {getattr(section, name)} is not in [0, 1]")


@dataclass
class MergerConfig:
    """The token merger between the vision tower and the projector."""

    enabled: bool = True
    variant: Literal["simple", "question_aware"] = "simple"
    merge_ratio: float | None = 0.5  # M = round(merge_ratio * N) centres ...
    target_merge_tokens: int | None = None  # ... or exactly this many (takes precedence)
    d_internal: int = 128
    num_heads: int = 4
    assign_tau: float = 1.0  # softmax temperature of the soft assignment to the centres
    # Centres spread over distinct content: 0 takes the top scores; ~2 keeps a few salient
    # regions from taking every centre (ops.diverse_topk). Applies in training and inference.
    diversity: float = 0.0
    # Patches over which that penalty fades with distance on the patch grid (None: it does not):
    # then only alike tokens near a centre are penalised, so alike objects apart each get one
    # (a centre scored below its image's mean, background, still penalises them everywhere).
    # Validation and inference only; training's Gumbel draws keep the content-only penalty
    # (with it there too, 11% on the testbed fell: docs/BENCHMARKS.md).
    diversity_radius: float | None = None
    # Learned logit of assigning a token to no centre (dropping it); None: every token is merged
    # somewhere. A high start (e.g. 4) begins as pruning and learns how much to merge.
    null_logit: float | None = None
    # [low, high]: every training step draws its merge ratio uniformly from this range (a
    # deterministic draw per step), so one merger learns to serve every budget in it; None:
    # always merge_ratio / target_merge_tokens. Validation and inference use the fixed count.
    train_merge_range: list[float] | None = None
    # Where the straight-through selection gate acts in training: "values" scales the centres,
    # "keys" weights them as attention keys in every LLM layer (steadier on a deeper LLM).
    gate: Literal["values", "keys"] = "values"

    def __post_init__(self):
        at_least(self, 1, "target_merge_tokens", "d_internal", "num_heads")
        positive(self, "assign_tau")
        at_least(self, 0, "diversity")


@dataclass
class PrunerConfig:
    """The layer pruner heads inside the LLM."""

    enabled: bool = True
    # Decoder layers a head acts before; None spreads them like [10, 20, 31] of 32 layers.
    pruning_layers: list[int] | None = None
    d_internal: int = 128
    num_heads: int = 4
    init_keep_bias: float = 2.0  # a fresh head keeps tokens with probability sigmoid(2) = 0.88
    # Share of the visual tokens entering the LLM still kept after the last head; head i of K
    # aims at target_ratio ** (i / K) of them, so every head removes the same share.
    target_ratio: float = 0.5
    # At inference each head keeps its top target share (None: static shapes), or with a value t
    # the tokens it gives a keep probability > t, a count per row (0.5: training's keep/drop boundary).
    keep_threshold: float | None = None

    def __post_init__(self):
        at_least(self, 1, "d_internal", "num_heads")
        if self.pruning_layers is not None and not (self.pruning_layers and min(self.pruning_layers) >= 1):
            raise TokensieveError(f"pruning_layers {self.pruning_layers}: give decoder layers >= 1 (a head acts "
                                  "before one), or null for the default spread")


@dataclass
class DiscriminatorConfig:
    """The optional discriminator of pruned vs unpruned hidden states."""

    enabled: bool = False
    layers: list[int] = field(default_factory=lambda: [-1, -3, -5])
    d_internal: int = 128
    reinit_prob: float = 0.0  # chance per step of re-initialising it (keeps it from winning outright)

    def __post_init__(self):
        at_least(self, 1, "d_internal")
        fraction(self, "reinit_prob")


@dataclass
class PrunerSettings:
    """What a two-stage pruner is. ``model``: the LLaVA checkpoint it was trained on (None: the shipped testbed)."""

    model: str | None = None
    merger: MergerConfig = field(default_factory=MergerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self):
        m = self.merger
        if m.merge_ratio is not None and not 0 < m.merge_ratio <= 1:
            raise TokensieveError(f"merger.merge_ratio {m.merge_ratio} is not in (0, 1]")
        low_high = m.train_merge_range
        if low_high is not None and not (len(low_high) == 2 and 0 < low_high[0] <= low_high[1] <= 1):
            raise TokensieveError(f"merger.train_merge_range {low_high} must be [low, high] with "
                                  "0 < low <= high <= 1")
        if m.diversity_radius is not None and m.diversity_radius <= 0:
            raise TokensieveError(f"merger.diversity_radius {m.diversity_radius} must be > 0 (patches), or null")
        if m.diversity_radius is not None and m.diversity == 0:
            raise TokensieveError("merger.diversity_radius fades the diversity penalty, but merger.diversity is 0: "
                                  "set merger.diversity > 0 or drop the radius")
        if m.enabled and m.merge_ratio is None and m.target_merge_tokens is None:
            raise TokensieveError("merger: set merge_ratio or target_merge_tokens")
        if not 0 < self.pruner.target_ratio <= 1:
            raise TokensieveError(f"pruner.target_ratio {self.pruner.target_ratio} is not in (0, 1]")
        threshold = self.pruner.keep_threshold
        if threshold is not None and not 0 <= threshold < 1:
            raise TokensieveError(f"pruner.keep_threshold {threshold} must be in [0, 1), or null")
        if not (m.enabled or self.pruner.enabled):
            raise TokensieveError("nothing to train: enable the merger, the pruner heads or both")


def default_pruning_layers(n_layers: int) -> list[int]:
    """Layers 10, 20 and 31 of a 32-layer LLM, scaled to ``n_layers`` (distinct, 1 .. n-1)."""
    layers = sorted({min(n_layers - 1, max(1, round(k * n_layers / 32))) for k in (10, 20, 31)})
    if not layers:
        raise TokensieveError(f"an LLM of {n_layers} layer(s) has no layer to prune before")
    return layers


def stage_targets(target_ratio: float, n_stages: int) -> list[float]:
    """Cumulative keep share after each of ``n_stages`` heads: ``target ** (i / n)``."""
    return [target_ratio ** ((i + 1) / n_stages) for i in range(n_stages)]
