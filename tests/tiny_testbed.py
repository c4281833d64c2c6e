"""The tiny testbed training run the testbed tests share (seconds): its config, and a run cut by an
interruption before an LLM step, then resumed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokensieve.testbed.train as train_module
from tokensieve.testbed import model as model_module
from tokensieve.testbed.train import STATE_FILE, train_testbed

TINY = dict(tower_steps=3, tower_batch=8, llm_steps=6, llm_batch=8, warmup_steps=2, checkpoint_every=2,
            eval_every=1000, eval_samples=10, object_curriculum=[(0, 1, 2), (3, 3, 5)],
            mention_layer=1, relation_layer=2,
            size=model_module.TestbedSize(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                             text_layers=2, text_heads=2))


def interrupted_then_resumed(folder: Path, config: dict, monkeypatch) -> tuple[dict, Path]:
    """Train ``config`` into ``folder``, interrupted (KeyboardInterrupt) before LLM step 5 of
    ``config["llm_steps"]``, then resumed there: what the interrupted run saved (``STATE_FILE``) and the
    resumed run's folder. Undoes ``monkeypatch`` before resuming."""
    real_lr_at = train_module.lr_at

    def interrupt_at_llm_step_5(step, total, *args):
        if total == config["llm_steps"] and step == 5:
            raise KeyboardInterrupt
        return real_lr_at(step, total, *args)

    monkeypatch.setattr(train_module, "lr_at", interrupt_at_llm_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_testbed(folder, train_module.TestbedTrainConfig(**config))
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    monkeypatch.undo()
    return saved, train_testbed(folder, train_module.TestbedTrainConfig(**config))
