"""Every setting of a two-stage pruner training run (``tokensieve train CONFIG.yaml``).

These dataclasses are the source of truth; YAML files store them (``tokensieve.config``), and
the resolved config is saved beside the run so a run can always be told what it was. The
pruner's own sections (``merger``, ``pruner``, ``discriminator``) live in
:mod:`tokensieve.pruner.settings`, which inference reads without this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokensieve.devices import check_device_name
from tokensieve.errors import TokensieveError
from tokensieve.pruner.settings import PrunerSettings, at_least, fraction, positive


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
        at_least(self, 0, "task", "distill", "sparsity", "merge_sparsity", "hidden_mse", "adversarial")
        positive(self, "distill_temperature")


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
        positive(self, "tau_start", "tau_end")
        at_least(self, 0, "tau_floor")
        fraction(self, "anneal_fraction", "sparsity_warmup", "target_curriculum")


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
        at_least(self, 1, "steps", "batch_size")
        at_least(self, 0, "lr_token_merger", "lr_layer_pruners", "lr_discriminator", "weight_decay")
        positive(self, "grad_clip")
        fraction(self, "lr_floor")


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
        at_least(self, 1, "every", "samples")


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
        at_least(self, 1, "checkpoint_every", "threads")
        at_least(self, 0, "seed")
        check_device_name(self.device)


@dataclass
class TwoStageConfig(PrunerSettings):
    """A whole training run: the pruner's settings (``model``, ``merger``, ``pruner``,
    ``discriminator``: :class:`PrunerSettings`) and how it is trained."""

    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.data.seed < 0:
            raise TokensieveError(f"data.seed {self.data.seed} must be >= 0")
        if self.data.kind == "instruct" and not (self.data.path and self.data.image_folder):
            raise TokensieveError("data.kind 'instruct' needs data.path and data.image_folder")
