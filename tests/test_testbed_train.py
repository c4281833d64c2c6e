"""Testbed training (seconds, tiny sizes): an ordinary LLaVA checkpoint, and exact resume."""

from __future__ import annotations

import pytest
import torch
from tiny_testbed import TINY, interrupted_then_resumed

import tokensieve.testbed.train as train_module
from tokensieve.backbones import LlavaBackbone
from tokensieve.errors import TokensieveError
from tokensieve.testbed import model as model_module
from tokensieve.testbed.train import train_testbed

# Module-qualified so pytest does not mistake the Test*-named dataclasses for test classes.
TrainConfig = train_module.TestbedTrainConfig


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
    saved, resumed = interrupted_then_resumed(tmp_path / "cut", TINY, monkeypatch)
    assert (saved["state"]["stage"], saved["state"]["step"]) == ("llm", 4)

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
