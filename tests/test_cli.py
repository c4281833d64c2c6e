"""The CLI on tiny local checkpoints: results on good input, one-line errors and exit 2 on bad."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from tokensieve.cli import main
from tokensieve.data.synthetic import make_sample
from tokensieve.methods import list_methods
from tokensieve.testbed.evaluate import TARGETS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokensieve", *map(str, args)], capture_output=True, text=True)


def test_testbed_eval_json_on_a_tiny_model(tiny_llava_dir, capsys):
    assert main(["testbed", "eval", "--model", str(tiny_llava_dir), "--samples", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "per_family", "question_only_accuracy", "blank_image_accuracy", "n_visual_tokens",
                "random_keep_11_accuracy", "object_keep_accuracy", "cls_attention_object_ratio"):
        assert key in report
    assert report["n_visual_tokens"] == 64 and report["n_samples"] == 10
    assert set(report["per_family"]) == {"color_of_shape", "shape_of_color", "count", "exists", "spatial"}
    assert set(report["targets"]) == set(TARGETS)


def test_ask_answers_from_an_image_file(tiny_llava_dir, tmp_path, capsys):
    path = tmp_path / "scene.png"
    Image.fromarray(make_sample(0, 0).image).save(path)
    assert main(["ask", "--model", str(tiny_llava_dir), "--image", str(path), "--question", "Is there a red circle?"]) == 0
    assert capsys.readouterr().out.strip() != ""


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unreadable_image(tiny_llava_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    _one_line_error(run_cli("ask", "--model", tiny_llava_dir, "--image", bad, "--question", "Is there a red circle?"),
                    "cannot read image", "broken.png")
    _one_line_error(run_cli("ask", "--model", tiny_llava_dir, "--image", tmp_path / "missing.png",
                            "--question", "?"), "missing.png", "does not exist")


def test_folder_that_is_not_a_model(tmp_path):
    _one_line_error(run_cli("testbed", "eval", "--model", tmp_path), "no config.json")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    _one_line_error(run_cli("testbed", "eval", "--model", tmp_path), "cannot load model")


def test_wrong_model_type(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    _one_line_error(run_cli("testbed", "eval", "--model", tmp_path), "'llama' model", "LlavaForConditionalGeneration")


def test_bad_numbers_are_usage_errors():
    result = run_cli("testbed", "eval", "--samples", "0")
    assert result.returncode == 2 and "positive integer" in result.stderr


def test_testbed_train_takes_the_llm_depth_and_lookup_layers(tmp_path, monkeypatch):
    import tokensieve.testbed.train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "train_testbed", lambda out, cfg, resume: seen.setdefault("cfg", cfg) and out)
    main(["testbed", "train", "--out", str(tmp_path), "--llm-layers", "8", "--mention-layer", "4",
          "--relation-layer", "5", "--llm-steps", "7"])
    cfg = seen["cfg"]
    assert (cfg.size.text_layers, cfg.mention_layer, cfg.relation_layer, cfg.llm_steps) == (8, 4, 5, 7)
    assert cfg.size.text_hidden == train_module.TestbedTrainConfig().size.text_hidden


def test_testbed_lookup_beyond_the_llm_is_a_one_line_error():
    result = run_cli("testbed", "train", "--out", "unused", "--llm-layers", "4", "--relation-layer", "6")
    assert result.returncode == 2 and "relation_layer 6" in result.stderr and "Traceback" not in result.stderr


def test_methods_lists_every_method_with_its_default_sites(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(list_methods())
    assert "default site llm.2 " in lines["fastv"]
    # a schedule placed by the LLM's depth shows its sites in LLaVA-1.5's 32 layers
    assert "default site llm.8,llm.16,llm.24 of 32" in lines["pyramiddrop"]


def test_a_reader_that_stops_early_gets_no_traceback():
    """``tokensieve methods | head -1``: the closed pipe ends the command quietly, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "tokensieve", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.read(10)
    proc.stdout.close()  # like head, stop reading after the first bytes
    assert proc.wait(timeout=120) == 0
    assert b"Traceback" not in proc.stderr.read()
