"""Testbed training (seconds, tiny sizes): an ordinary LLaVA checkpoint, and exact resume."""

from __future__ import annotations

import pytest
import torch

import tokensieve.testbed.train as train_module
from tokensieve.backbones import LlavaBackbone
from tokensieve.errors import TokensieveError
from tokensieve.testbed import model as model_module
from tokensieve.testbed.train import STATE_FILE, train_testbed

# Module-qualified so pytest does not mistake the Test*-named dataclasses for test classes.
TrainConfig = train_module.TestbedTrainConfig

TINY = dict(tower_steps=3, tower_batch=8, llm_steps=6, llm_batch=8, warmup_steps=2, checkpoint_every=2,
            eval_every=1000, eval_samples=10, object_curriculum=[(0, 1, 2), (3, 3, 5)],
            mention_layer=1, relation_layer=2,
            size=model_module.TestbedSize(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                             text_layers=2, text_heads=2))


def test_lookup_layers_beyond_the_llm_are_refused():
    with pytest.raises(TokensieveError, match="relation_layer 3 .* <= 2"):
        TrainConfig(**{**TINY, "relation_layer": 3})


def test_training_writes_a_loadable_llava_checkpoint(tmp_path):
    out = train_testbed(tmp_path / "run", TrainConfig(**TINY))
    backbone = LlavaBackbone.from_pretrained(out)
    assert backbone.n_visual_tokens == 100 and backbone.processor is not None
    assert (out / "train_log.jsonl").read_text().count("heldout_accuracy") == 1


def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch):
    whole = train_testbed(tmp_path / "whole", TrainConfig(**TINY))

    real_lr_at = train_module.lr_at

    def interrupt_at_llm_step_5(step, total, *args):
        if total == TINY["llm_steps"] and step == 5:
            raise KeyboardInterrupt
        return real_lr_at(step, total, *args)

    monkeypatch.setattr(train_module, "lr_at", interrupt_at_llm_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_testbed(tmp_path / "cut", TrainConfig(**TINY))
    saved = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)["state"]
    assert (saved["stage"], saved["step"]) == ("llm", 4)
    monkeypatch.undo()
    resumed = train_testbed(tmp_path / "cut", TrainConfig(**TINY))

    a = LlavaBackbone.from_pretrained(whole).model.state_dict()
    b = LlavaBackbone.from_pretrained(resumed).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_config_names_the_keys(tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    run = train_module._Run(cut, TrainConfig(**TINY), resume=False)
    run.save(torch.optim.SGD(run.model.parameters(), lr=0.1))
    with pytest.raises(TokensieveError, match=r"another config \(mention_layer, relation_layer, size differ\)"):
        train_module._Run(cut, TrainConfig(**{**TINY, "mention_layer": 2, "relation_layer": 3,
                                              "size": model_module.TestbedSize(text_layers=3)}), resume=True)
    # Longer training is a legitimate change on resume.
    resumed = train_module._Run(cut, TrainConfig(**{**TINY, "llm_steps": 9}), resume=True)
    assert resumed.state["stage"] == "tower"
