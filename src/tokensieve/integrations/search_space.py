"""What ``tokensieve search CONFIG.yaml`` reads: the training config trials start from, the
search space over its dotted keys, the objective and the Optuna study settings.

Every key of the space is checked against :class:`TwoStageConfig` with the same machinery as
``tokensieve train --set`` (``tokensieve.config``): a trial's values become dotted overrides,
so an unknown key or a value of the wrong type is named before any trial runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokensieve.config import apply_overrides, from_dict, load_config, to_dict
from tokensieve.errors import TokensieveError
from tokensieve.train.two_stage_config import TwoStageConfig


@dataclass
class Param:
    """One dimension: a range (``low``, ``high``, optional ``log`` and ``step``) or ``choices``.

    A range whose ``low`` and ``high`` are both integers draws integers.
    """

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None

    def __post_init__(self):
        is_range = self.low is not None or self.high is not None
        if self.choices is not None:
            if is_range or self.log or self.step is not None:
                raise TokensieveError("give either choices or a range (low, high, log, step), not both")
            if not self.choices:
                raise TokensieveError("choices is empty")
            return
        if self.low is None or self.high is None:
            raise TokensieveError("a range needs both low and high (or give choices)")
        if not self.low < self.high:
            raise TokensieveError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise TokensieveError(f"a log range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise TokensieveError("a range is either log or stepped, not both")

    @property
    def is_int(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int) and (
            self.step is None or isinstance(self.step, int))

    @property
    def encoded(self) -> bool:
        """Optuna takes scalar choices only; lists and mappings travel as JSON text."""
        return self.choices is not None and any(isinstance(c, (list, dict)) for c in self.choices)

    def candidates(self) -> list[Any]:
        """Values that must each make a valid config (the ends of a range, every choice)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass
class Objective:
    """Maximised: ``val_accuracy - flops_weight * flops_ratio``.

    val_accuracy: the run's best validation score (what ``best/`` holds), reported to Optuna at
    every validation for pruning. flops_ratio: prefill FLOPs of the trained pruner at its trained
    budget over the unpruned model's, for the validation prompts' median length. With the
    default weight 0 the objective is accuracy at the budget the config fixes.
    """

    flops_weight: float = 0.0

    def __post_init__(self):
        if self.flops_weight < 0:
            raise TokensieveError(f"objective.flops_weight {self.flops_weight} must be >= 0")


@dataclass
class StudySettings:
    """name: the Optuna study (default: the search file's name without ``.yaml``).
    heartbeat_s: a running trial whose worker sent no heartbeat for twice this long is marked
    failed and, up to ``retries`` times, run again with the same values, resuming its run folder.
    """

    name: str | None = None
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = None
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = 3  # median pruner: finished trials before any trial is pruned
    warmup_steps: int = 0  # median pruner: no pruning at training steps up to this one
    heartbeat_s: int = 60
    retries: int = 1

    def __post_init__(self):
        if self.heartbeat_s < 1:
            raise TokensieveError(f"study.heartbeat_s {self.heartbeat_s} must be >= 1")
        if self.retries < 0 or self.startup_trials < 0 or self.warmup_steps < 0:
            raise TokensieveError("study.retries, study.startup_trials and study.warmup_steps must be >= 0")


@dataclass
class SearchConfig:
    """train: the training config file trials start from (relative to the search file).
    set: dotted keys fixed for every trial. space: dotted key -> :class:`Param`."""

    train: str
    space: dict[str, Param]
    set: dict[str, Any] = field(default_factory=dict)
    objective: Objective = field(default_factory=Objective)
    study: StudySettings = field(default_factory=StudySettings)

    def __post_init__(self):
        if not self.space:
            raise TokensieveError("space is empty: name at least one config key to search")
        both = sorted(set(self.space) & set(self.set))
        if both:
            raise TokensieveError(f"{', '.join(both)} is both searched (space) and fixed (set)")


def overrides(values: dict[str, Any]) -> list[str]:
    """``{"optim.steps": 200}`` -> ``["optim.steps=200"]``, read back exactly by ``apply_overrides``
    (JSON is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


@dataclass
class Search:
    """A checked search: its settings, and the training config (as a dict) that trials start from."""

    cfg: SearchConfig
    base: dict[str, Any]
    name: str

    def trial_config(self, values: dict[str, Any]) -> TwoStageConfig:
        """The training config of a trial with these space ``values``."""
        return from_dict(TwoStageConfig, apply_overrides(self.base, overrides(values)))


def load_search(path: str | Path) -> Search:
    """Read and check a search file: its training config loads, and every value of the space
    (each choice, both ends of each range) makes a valid training config on its own."""
    path = Path(path)
    cfg = load_config(SearchConfig, path)
    train_path = path.parent / cfg.train
    base = to_dict(load_config(TwoStageConfig, train_path, overrides(cfg.set)))
    search = Search(cfg, base, cfg.study.name or path.stem)
    for key, param in cfg.space.items():
        for value in param.candidates():
            try:
                search.trial_config({key: value})
            except TokensieveError as err:
                raise TokensieveError(f"{path}: space key '{key}' = {value!r}: {err}") from None
    return search
