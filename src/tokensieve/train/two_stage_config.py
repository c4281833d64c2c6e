"""Every setting of a two-stage pruner training run (``tokensieve train CONFIG.yaml``).

These dataclasses are the source of truth; YAML files store them (``tokensieve.config``), and
the resolved config is saved beside the run so a run can always be told what it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokensieve.devices import check_device_name
from tokensieve.errors import TokensieveError


def _at_least(section: object, minimum: float, *names: str) -> None:
    """Refuse a field of ``section`` below ``minimum`` (a field left None is not checked)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise TokensieveError(f"{name} {value} must be >= {minimum}")


def _positive(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise TokensieveError(f"{name} {getattr(section, name)} must be > 0")


def _fraction(section: object, *names: str) -> None:
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
        _at_least(self, 1, "target_merge_tokens", "d_internal", "num_heads")
        _positive(self, "assign_tau")
        _at_least(self, 0, "diversity")


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
        _at_least(self, 1, "d_internal", "num_heads")
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
        _at_least(self, 1, "d_internal")
        _fraction(self, "reinit_prob")


@dataclass
class LossConfig:
    """Weights of the loss terms (0 switches a term off)."""

    task: float = 1.0
    distill: float = 1.0
    distill_temperature: float = 1.0
    sparsity: float = 2.0
    merge_sparsity: float = 0.1
    hidden_mse: float = 0.0
    adversarial: float = 0.0

    def __post_init__(self):
        _at_least(self, 0, "task", "distill", "sparsity", "merge_sparsity", "hidden_mse", "adversarial")
        _positive(self, "distill_temperature")


@dataclass
class ScheduleConfig:
    """Gumbel temperature, sparsity warm-up and target-ratio curriculum over training."""

    tau_start: float = 5.0
    tau_end: float = 0.1
    tau_kind: Literal["exponential", "linear"] = "exponential"
    anneal_fraction: float = 1.0
    tau_floor: float = 0.1
    sparsity_warmup: float = 0.1  # fraction of training with sparsity weight 0
    target_curriculum: float = 0.5  # fraction of training over which the target goes 1.0 -> target

    def __post_init__(self):
        _positive(self, "tau_start", "tau_end")
        _at_least(self, 0, "tau_floor")
        _fraction(self, "anneal_fraction", "sparsity_warmup", "target_curriculum")


@dataclass
class OptimConfig:
    """Optimizer groups (one learning rate each) and the step budget."""

    steps: int = 400
    batch_size: int = 16
    lr_token_merger: float = 1e-3
    lr_layer_pruners: float = 1e-3
    lr_discriminator: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: each group's rate down to lr_floor x it
    lr_floor: float = 0.1

    def __post_init__(self):
        _at_least(self, 1, "steps", "batch_size")
        _at_least(self, 0, "lr_token_merger", "lr_layer_pruners", "lr_discriminator", "weight_decay")
        _positive(self, "grad_clip")
        _fraction(self, "lr_floor")


@dataclass
class DataConfig:
    """Training data: the synthetic set, or LLaVA-format instruction JSON with an image folder."""

    kind: Literal["synthetic", "instruct"] = "synthetic"
    path: str | None = None
    image_folder: str | None = None
    seed: int = 0


@dataclass
class ValidationConfig:
    """Held-out answer-token accuracy of the deterministic parts, used to keep the best checkpoint."""

    every: int = 100
    samples: int = 200

    def __post_init__(self):
        _at_least(self, 1, "every", "samples")


@dataclass
class RunConfig:
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # or "cuda", "cuda:1": where the backbone and the parts run
    # The frozen backbone's dtype ("auto": as saved, e.g. float16 for llava-hf checkpoints).
    # The trainable parts keep float32 weights whatever it is.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self):
        _at_least(self, 1, "checkpoint_every", "threads")
        _at_least(self, 0, "seed")
        check_device_name(self.device)


@dataclass
class TwoStageConfig:
    """A whole training run. ``model``: a LLaVA checkpoint (None: the shipped testbed)."""

    model: str | None = None
    merger: MergerConfig = field(default_factory=MergerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run: RunConfig = field(default_factory=RunConfig)

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
        if self.data.seed < 0:
            raise TokensieveError(f"data.seed {self.data.seed} must be >= 0")
        if self.data.kind == "instruct" and not (self.data.path and self.data.image_folder):
            raise TokensieveError("data.kind 'instruct' needs data.path and data.image_folder")


def default_pruning_layers(n_layers: int) -> list[int]:
    """Layers 10, 20 and 31 of a 32-layer LLM, scaled to ``n_layers`` (distinct, 1 .. n-1)."""
    layers = sorted({min(n_layers - 1, max(1, round(k * n_layers / 32))) for k in (10, 20, 31)})
    if not layers:
        raise TokensieveError(f"an LLM of {n_layers} layer(s) has no layer to prune before")
    return layers


def stage_targets(target_ratio: float, n_stages: int) -> list[float]:
    """Cumulative keep share after each of ``n_stages`` heads: ``target ** (i / n)``."""
    return [target_ratio ** ((i + 1) / n_stages) for i in range(n_stages)]
