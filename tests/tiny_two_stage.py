"""The tiny two-stage training settings the two-stage tests share (seconds on the tiny models), and one
soft training step that must leave the backbone alone."""

from __future__ import annotations

import torch

from tokensieve.config import from_dict
from tokensieve.train.two_stage_config import TwoStageConfig

TINY_SETTINGS = {
    "merger": {"variant": "question_aware", "merge_ratio": 0.5, "d_internal": 16, "num_heads": 2,
               "diversity": 2.0, "diversity_radius": 1.5, "null_logit": 4.0, "train_merge_range": [0.25, 0.75]},
    "pruner": {"d_internal": 16, "num_heads": 2, "target_ratio": 0.5},
    "optim": {"steps": 4, "batch_size": 4},
    "validation": {"every": 100, "samples": 8},
    "run": {"checkpoint_every": 2, "threads": 1},
}


def tiny_config(model_dir, settings: dict = TINY_SETTINGS, **sections) -> TwoStageConfig:
    """The two-stage config of ``settings`` on the checkpoint ``model_dir``, each of ``sections``
    (e.g. ``merger={"gate": "keys"}``) updating its section."""
    data = {"model": str(model_dir), **{k: dict(v) for k, v in settings.items()}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(TwoStageConfig, data)


def step_leaving_the_backbone_alone(trainer) -> dict:
    """One soft training step of ``trainer``'s parts, its log row; asserts the backbone got no gradient
    and kept every weight."""
    before = {k: v.clone() for k, v in trainer.backbone.model.state_dict().items()}
    trainer.parts.train()
    handle = trainer.parts.attach(trainer.backbone, "soft", training=True)
    try:
        row = trainer.train_step(handle)
    finally:
        handle.detach()
    assert all(p.grad is None for p in trainer.backbone.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in trainer.backbone.model.state_dict().items())
    return row
