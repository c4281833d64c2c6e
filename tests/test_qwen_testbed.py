"""The Qwen2.5-VL testbed (seconds, tiny sizes): scenes of several sizes reach the LLM as rows of
different token counts, the stage-1 features line up with the merger's tokens, training writes
a loadable Qwen checkpoint and resumes exactly, and ``testbed eval --backbone qwen`` runs on it."""

from __future__ import annotations

import json

import pytest
import torch

import tokensieve.testbed.train as train_module
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.backbones.qwen_prompt import encode
from tokensieve.cli import main
from tokensieve.data.synthetic import make_sample
from tokensieve.data.synthetic_eval import object_attention_ratio
from tokensieve.testbed.evaluate import QWEN_TARGETS, evaluate_testbed
from tokensieve.testbed.qwen_family import SYSTEM, QwenTestbed, token_patches
from tokensieve.testbed.qwen_model import QWEN_SCENES, QWEN_SIZES
from tokensieve.testbed.received_attention import recorded_received_attention
from tokensieve.testbed.train import train_testbed

from tiny_testbed import TINY, interrupted_then_resumed

QWEN_TINY = {**TINY, "backbone": "qwen", "position_layer": 1}
TrainConfig = train_module.TestbedTrainConfig  # module-qualified: not a pytest test class


@pytest.fixture(scope="module")
def tiny_qwen_testbed(tmp_path_factory):
    return train_testbed(tmp_path_factory.mktemp("qwen") / "run", TrainConfig(**QWEN_TINY))


def test_rows_of_one_batch_carry_the_token_counts_of_their_image_sizes():
    testbed = QwenTestbed()
    _, processor = testbed.build(TINY["size"])
    samples = [make_sample(0, i, QWEN_SCENES) for i in range(12)]
    assert {s.image.shape[:2] for s in samples} == set(QWEN_SIZES)
    batch = encode(processor, samples, SYSTEM)
    counts = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(1)
    # Not resized away: each image's tokens are its scene grid (one 16 px token per scene patch).
    assert counts.tolist() == [s.grid[0] * s.grid[1] for s in samples]
    assert batch["image_grid_thw"].tolist() == [[1, 2 * s.grid[0], 2 * s.grid[1]] for s in samples]
    assert sorted({s.grid[0] * s.grid[1] for s in samples}) == [64, 80, 90, 100]


def test_stage_one_features_are_the_merger_tokens_in_order_and_the_projector_starts_as_their_readouts():
    testbed = QwenTestbed()
    model, processor = testbed.build(TINY["size"])
    batch = testbed.tower_batches(processor, 0, 3)[0]
    visual = model.model.visual
    with torch.no_grad():
        out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        patches = token_patches(visual, out.last_hidden_state, batch["image_grid_thw"])
        assert len(patches) == len(batch["colour_ids"])
        torch.testing.assert_close(visual.merger.mlp(patches.flatten(1)), out.pooler_output)
        probe = testbed.tower_probe(TINY["size"])
        testbed.init_projector(model, probe)
        readouts = torch.cat([probe.colour(patches[:, 0]), probe.shape(patches[:, 0])], dim=-1)
        torch.testing.assert_close(visual.merger.mlp[0](patches.flatten(1))[:, : readouts.shape[1]], readouts)


def test_training_writes_a_loadable_qwen_checkpoint_that_testbed_eval_checks(tiny_qwen_testbed):
    backbone = QwenVLBackbone.from_pretrained(tiny_qwen_testbed)
    assert backbone.family == "qwen2_5_vl" and backbone.most_image_tokens() == 100
    assert (tiny_qwen_testbed / "train_log.jsonl").read_text().count("heldout_accuracy") == 1
    report = evaluate_testbed(backbone, n_samples=10, batch_size=5, progress=False)
    assert set(report["targets"]) == set(QWEN_TARGETS)
    assert report["visual_tokens_per_size"] == {"64x64": 64, "64x80": 80, "80x72": 90, "80x80": 100}
    assert report["n_visual_tokens"] == 100 and "cls_attention_object_ratio" not in report
    assert report["received_attention_object_ratio"] > 0  # reported, no target


def test_the_object_attention_ratio_is_the_objects_share_of_attention_over_their_share_of_tokens():
    samples = [make_sample(3, i, QWEN_SCENES.at(*size)) for i, size in enumerate(QWEN_SIZES[:2])]
    rows = []
    for s in samples:  # half the attention on the objects' tokens
        row = torch.ones(s.grid[0] * s.grid[1])
        row[list(s.object_patches)] = (row.numel() - len(s.object_patches)) / len(s.object_patches)
        rows.append(row)
    expected = sum(0.5 / (len(s.object_patches) / (s.grid[0] * s.grid[1])) for s in samples) / 2
    assert object_attention_ratio(rows, samples) == pytest.approx(expected)  # images of two sizes in one call


def test_the_received_attention_recorder_keeps_every_token_and_reads_each_image(tiny_qwen_testbed):
    backbone = QwenVLBackbone.from_pretrained(tiny_qwen_testbed)
    samples = [make_sample(3, i, QWEN_SCENES.at(*size)) for i, size in enumerate(QWEN_SIZES)]
    batch = encode(backbone.processor, samples, SYSTEM)
    with torch.no_grad():
        plain = backbone.forward(**batch).logits
        with recorded_received_attention(backbone) as seen:
            assert torch.equal(backbone.forward(**batch).logits, plain)  # keep-all: the plain model
        assert torch.equal(backbone.forward(**batch).logits, plain)  # detached
    assert [len(row) for row in seen] == [s.grid[0] * s.grid[1] for s in samples]  # 64, 80, 90, 100
    assert all(bool((row >= 0).all()) and float(row.sum()) > 0 for row in seen)


def test_interrupted_qwen_training_resumes_exactly(tmp_path, monkeypatch, tiny_qwen_testbed):
    saved, resumed = interrupted_then_resumed(tmp_path / "cut", QWEN_TINY, monkeypatch)
    assert (saved["state"]["stage"], saved["state"]["step"], saved["config"]["backbone"]) == ("llm", 4, "qwen")
    assert set(saved["positions"]) == {"row.weight", "row.bias", "col.weight", "col.bias"}  # resumed too
    a = QwenVLBackbone.from_pretrained(tiny_qwen_testbed).model.state_dict()
    b = QwenVLBackbone.from_pretrained(resumed).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_llava_state_is_not_resumed_as_a_qwen_testbed(tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    run = train_module._Run(cut, TrainConfig(**TINY), resume=False)
    run.save(torch.optim.SGD(run.model.parameters(), lr=0.1))
    with pytest.raises(train_module.TokensieveError, match=r"another config \(backbone, position_layer differ\)"):
        train_module._Run(cut, TrainConfig(**QWEN_TINY), resume=True)


def test_qwen_eval_without_a_model_checks_the_shipped_qwen_testbed(capsys):
    assert main(["testbed", "eval", "--backbone", "qwen", "--samples", "20", "--batch-size", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_samples"] == 20 and report["visual_tokens_per_size"] == {"64x64": 64, "64x80": 80, "80x72": 90,
                                                                              "80x80": 100}


def test_testbed_train_takes_the_qwen_backbone(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_module, "train_testbed", lambda out, cfg, resume: seen.setdefault("cfg", cfg) and out)
    assert main(["testbed", "train", "--backbone", "qwen", "--out", str(tmp_path), "--llm-steps", "7",
                 "--tower-batch", "16", "--position-layer", "2"]) == 0
    assert (seen["cfg"].backbone, seen["cfg"].llm_steps, seen["cfg"].tower_batch) == ("qwen", 7, 16)
    assert seen["cfg"].position_layer == 2


def test_testbed_eval_json_on_the_tiny_qwen_testbed(tiny_qwen_testbed, capsys):
    assert main(["testbed", "eval", "--backbone", "qwen", "--model", str(tiny_qwen_testbed), "--samples", "5",
                 "--batch-size", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["targets"]) == set(QWEN_TARGETS) and report["n_samples"] == 5
