"""``tokensieve demo`` end to end on a tiny model, in seconds (the real one takes minutes)."""

from __future__ import annotations

from pathlib import Path

from tiny_qwen_testbed import save_untrained_qwen_testbed

from tokensieve.cli import main
from tokensieve.config import load_config
from tokensieve.data.synthetic_eval import heldout_samples
from tokensieve.demo import QWEN_DEMO_CONFIG, demo_config
from tokensieve.evaluate.report import load_report
from tokensieve.methods import list_methods, method_class
from tokensieve.testbed.qwen_model import QWEN_SCENES
from tokensieve.train.two_stage_config import TwoStageConfig

REPO = Path(__file__).resolve().parent.parent


def test_the_demo_config_is_the_documented_one():
    assert demo_config() == load_config(TwoStageConfig, REPO / "configs" / "two_stage_testbed.yaml")


def test_demo_trains_compares_every_method_and_writes_the_report(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    # The tiny model has 64 tokens: 11% would leave fewer than the anchor rule's 10 anchors.
    assert main(["demo", "--out", str(out), "--samples", "5", "--budget", "0.33,0.22,0.2", "--set", f"model={tiny_llava_dir}",
                 "--set", "optim.steps=2", "--set", "optim.batch_size=2", "--set", "validation.samples=4",
                 "--set", "pruner.d_internal=16", "--set", "merger.d_internal=16",
                 "--set", "pruner.pruning_layers=[2]"]) == 0  # the tiny LLM has 3 layers
    printed = capsys.readouterr()
    assert str(out / "report" / "report.md") in printed.out
    report = load_report(out / "report")
    rows, left_out = report["rows"], report["meta"]["left out"]
    free = [name for name in list_methods() if not method_class(name).trained]
    # Every training-free method is measured, or named with the reason it cannot run here.
    for name in free:
        assert any(r["method"] == name for r in rows) or f"{name} at " in left_out, name
    assert {r["method"] for r in rows} <= {"none", "two_stage", "object_oracle", *free}
    assert "cdpruner at 0.33: cdpruner needs a CLIP text encoder" in left_out  # no CLIP text tower here
    assert "tokensieve demo: left out cdpruner at 0.33" in printed.err
    assert {r["budget"] for r in rows if r["method"] == "two_stage"} == {"0.33", "0.22", "0.2"}
    for name in ("accuracy_vs_tokens.png", "tokens_per_layer.png", "samples.jsonl"):
        assert (out / "report" / name).stat().st_size > 0
    assert (out / "pruner" / "done.json").exists()


def test_the_qwen_demo_config_is_the_documented_one():
    assert demo_config(name=QWEN_DEMO_CONFIG) == load_config(TwoStageConfig, REPO / "configs" / QWEN_DEMO_CONFIG)


def test_qwen_demo_compares_what_runs_on_qwen_per_image_and_pictures_each_image(tmp_path, capsys):
    model = save_untrained_qwen_testbed(tmp_path / "testbed")
    out = tmp_path / "demo"
    assert main(["demo", "--backbone", "qwen", "--model", str(model), "--out", str(out), "--samples", "4",
                 "--budget", "0.33,0.11", "--timing-samples", "0", "--set", "optim.steps=2",
                 "--set", "optim.batch_size=2", "--set", "validation.samples=4", "--set", "pruner.d_internal=16",
                 "--set", "merger.d_internal=16", "--set", "pruner.pruning_layers=[1]"]) == 0  # 2 LLM layers
    printed = capsys.readouterr()
    report = load_report(out / "report")
    rows, left_out = report["rows"], report["meta"]["left out"]
    for name in (name for name in list_methods() if not method_class(name).trained):
        assert any(r["method"].split("(")[0] == name for r in rows) or f"{name} at " in left_out, name
    # Defaults refused on Qwen-VL run as the variant the library names: the authors' VisionZip port, ours for
    # the other CLS-attention methods and PyramidDrop's positions; the rest are left out with why.
    methods = {r["method"] for r in rows}
    assert {"visionzip(importance=received_attention, cls=drop, order=positions)",
            "fastervlm(importance=received_attention)"} <= methods
    assert "visionzip at " not in left_out and "prumerge at 0.33: " in left_out
    # PyramidDrop renumbers positions by default; with its original positions it needs more than 2 layers here
    assert "pyramiddrop at 0.33: pyramiddrop" in left_out and "as pyramiddrop(positions=original): " in left_out
    assert "tokensieve demo: left out tome at 0.11" in printed.err
    assert {(r["site"], r["budget"]) for r in rows if r["method"] == "two_stage"} == {("llm.0", "0.33"), ("llm.0", "0.11")}
    assert {(r["site"], r["budget"]) for r in rows if r["method"] == "object_oracle"} == {("llm.0", "0.33"),
                                                                                          ("llm.0", "0.11")}
    assert "means over the items" in report["meta"]["visual_tokens"]
    tokens = [s.grid[0] * s.grid[1] for s in heldout_samples(4, spec=QWEN_SCENES)]
    assert len(set(tokens)) > 1 and rows[0]["visual_tokens_kept"] == sum(tokens) / 4  # images of several sizes
    for name in ("accuracy_vs_tokens.png", "tokens_per_layer.png", "kept_tokens/item_0.png"):
        assert (out / "report" / name).stat().st_size > 0
