"""``tokensieve clip-benchmark``: the real clip_benchmark CLI end to end on the shipped tiny CLIP and
the synthetic shape sets in the local wds layout, with and without pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokensieve.cli import main
from tokensieve.clip.shapes import CLASSNAMES
from tokensieve.clip.wds import write_shape_datasets
from tokensieve.optional import import_open_clip

TINY = ["--model", "tokensieve-tiny-clip", "--pretrained", "tokensieve", "--num_workers", "0", "--no_amp",
        "--batch_size", "48", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shape_datasets(out, classification_images=72, retrieval_images=24, per_shard=32)
    return out


def classification(data: Path, output: Path) -> list[str]:
    return ["--dataset", "wds/shapes_classification", "--dataset_root", f"{data}/{{dataset}}", "--output", str(output)]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_with_and_without_pruning(data, tmp_path, capsys):
    from clip_benchmark import cli, models
    from clip_benchmark.metrics import zeroshot_classification

    before = (dict(models.TYPE2FUNC), cli.run, zeroshot_classification.accuracy)
    base_file, pruned_file = tmp_path / "base.json", tmp_path / "pruned.json"
    assert run(["clip-benchmark", "eval", *TINY, *classification(data, base_file)], capsys)[0] == 0
    code, out, _ = run(["clip-benchmark", "eval", *TINY, *classification(data, pruned_file), "--enable_pruning",
                        "--k_anchors", "5", "--top_m", "15"], capsys)
    assert code == 0 and str(pruned_file) in out
    base, pruned = json.loads(base_file.read_text()), json.loads(pruned_file.read_text())
    assert base["metrics"]["acc1"] > 0.6  # chance is 1/18
    assert pruned["metrics"]["acc1"] > 0.4
    assert base["tokensieve"]["pruning"] == {"enabled": False}
    assert base["tokensieve"]["image_tokens_per_block"] == [65, 65, 65, 65]
    record = pruned["tokensieve"]
    assert record["pruning"]["method"] == {"name": "anchor", "k_anchors": 5, "top_m": 15, "alpha": 0.5}
    assert record["pruning"]["prune_layers"] == [1, 2, 3]
    assert record["image_tokens_per_block"] == [65, 21, 21, 21]
    assert record["versions"]["clip_benchmark"] == "1.6.2"
    assert (dict(models.TYPE2FUNC), cli.run, zeroshot_classification.accuracy) == before  # all put back


def test_retrieval_with_pruning(data, tmp_path, capsys):
    output = tmp_path / "retrieval.json"
    code, _, _ = run(["clip-benchmark", "eval", *TINY, "--dataset", "wds/shapes_retrieval", "--dataset_root",
                      f"{data}/{{dataset}}", "--task", "zeroshot_retrieval", "--output", str(output),
                      "--enable_pruning", "--prune_method", "tome", "--k_anchors", "4", "--top_m", "12",
                      "--prune_layers", "2"], capsys)
    result = json.loads(output.read_text())
    assert code == 0 and set(result["metrics"]) == {"image_retrieval_recall@5", "text_retrieval_recall@5"}
    # ToMe merges inside blocks 2 and 3 (32, then 16): each runs on what the blocks before it left
    assert result["tokensieve"]["image_tokens_per_block"] == [65, 65, 65, 33]


def test_an_open_clip_model_through_clip_benchmarks_own_loader(data, tmp_path, capsys):
    """A model open_clip knows by name (here a tiny random ViT config) loads through
    clip_benchmark's ``load_open_clip``, as ``--model ViT-B-32 --pretrained openai`` would."""
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "test-tiny-vit.json").write_text(json.dumps(config))
    import_open_clip().add_model_config(tmp_path / "test-tiny-vit.json")
    output, attention = tmp_path / "r.json", tmp_path / "att_{dataset}.pt"
    code, _, _ = run(["clip-benchmark", "eval", "--model", "test-tiny-vit", "--pretrained", "", "--num_workers", "0",
                      "--no_amp", "--quiet", *classification(data, output), "--enable_pruning", "--prune_method",
                      "random", "--k_anchors", "2", "--top_m", "6", "--extract_attention",
                      "--attention_output", str(attention)], capsys)
    assert code == 0
    record = json.loads(output.read_text())["tokensieve"]
    assert record["image_tokens_per_block"] == [17, 9]
    saved = torch.load(tmp_path / "att_wds_shapes_classification.pt")
    assert saved["cls_attention"][0].shape == (72, 16) and saved["cls_attention"][1].shape == (72, 8)
    assert saved["kept"]["random@vision.1:8"].shape == (72, 8)


def test_compare_prints_a_table(data, tmp_path, capsys):
    code, out, _ = run(["clip-benchmark", "compare", *TINY, *classification(data, tmp_path / "c.json"),
                        "--k_anchors", "5", "--top_m", "15", "--latency_batch", "4", "--latency_repeats", "1"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith(("shapes", "wds/"))]
    assert [line.split()[2] for line in lines] == ["baseline", "anchor"]
    assert "65->21 (31%)" in lines[1] and "speedup" in out
    pruned = json.loads((tmp_path / "c_pruned.json").read_text())
    assert pruned["tokensieve"]["latency"]["ideal_speedup"] > 1
    assert (tmp_path / "c_baseline.json").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--alpha", "1.5"], "--alpha 1.5 is not in [0, 1]"),
    (["--k_anchors", "20", "--top_m", "50"], ("k_anchors + top_m + 1 = 20 + 50 + 1 = 71 is more than the 65 tokens "
                                              "(64 patches + CLS)")),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, extra, message):
    output = tmp_path / "never.json"
    code, _, err = run(["clip-benchmark", "eval", *TINY, *classification(data, output), "--enable_pruning", *extra],
                       capsys)
    assert code == 2 and not output.exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith("tokensieve: error: ") and message in last


def test_a_model_that_is_not_a_vit_is_refused(data, tmp_path, capsys):
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "test-tiny-rn.json").write_text(json.dumps(config))
    import_open_clip().add_model_config(tmp_path / "test-tiny-rn.json")
    plain = ["clip-benchmark", "eval", "--model", "test-tiny-rn", "--pretrained", "", "--num_workers", "0", "--quiet",
             "--no_amp", *classification(data, tmp_path / "x.json")]
    code, _, err = run([*plain, "--enable_pruning"], capsys)
    assert code == 2 and "image tower is a ModifiedResNet, not a VisionTransformer" in err.splitlines()[-1]
    assert not (tmp_path / "x.json").exists()
    assert run(plain, capsys)[0] == 0  # unpruned, it is evaluated as clip_benchmark would
    assert json.loads((tmp_path / "x.json").read_text())["tokensieve"]["pruning"] == {"enabled": False}


def test_help_lists_the_pruning_flags_and_clip_benchmarks(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["clip-benchmark", "eval", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--enable_pruning" in out and "--dataset_root" in out


def test_wds_layout_is_deterministic(data, tmp_path):
    again = write_shape_datasets(tmp_path, classification_images=72, retrieval_images=24, per_shard=32)
    root = again["wds/shapes_classification"]
    assert (root / "classnames.txt").read_text().splitlines() == list(CLASSNAMES)
    assert (root / "test" / "nshards.txt").read_text().strip() == "3"
    assert (root / "test" / "0.tar").read_bytes() == (data / "shapes_classification" / "test" / "0.tar").read_bytes()
    assert (again["wds/shapes_retrieval"] / "dataset_type.txt").read_text().strip() == "retrieval"


def test_compare_writes_two_result_files_from_one_template():
    from tokensieve.integrations.clip_benchmark_cli import _with_suffix

    assert _with_suffix(["--dataset", "x", "--output", "r/{dataset}.json"], "_pruned") == \
        ["--dataset", "x", "--output", "r/{dataset}_pruned.json"]
    assert _with_suffix(["--output=out"], "_baseline") == ["--output", "out_baseline"]
    assert _with_suffix([], "_b")[-1] == "{dataset}_{pretrained}_{model}_{language}_{task}_b.json"


def test_loader_workers_are_capped_at_the_shards_of_a_local_wds_set(tmp_path):
    from argparse import Namespace

    from tokensieve.evaluate.clip_pruning import PruningSettings
    from tokensieve.integrations.clip_benchmark import ClipBenchmarkSession

    (tmp_path / "shapes_classification" / "test").mkdir(parents=True)
    (tmp_path / "shapes_classification" / "test" / "nshards.txt").write_text("3\n")
    session = ClipBenchmarkSession(PruningSettings())
    args = Namespace(dataset="wds/shapes_classification", dataset_root=f"{tmp_path}/{{dataset}}", split="test",
                     num_workers=4)
    session._cap_workers(args)
    assert args.num_workers == 3 and "num_workers 4 -> 3" in session.workarounds[0]
    args.num_workers = 2  # already few enough: left alone
    session._cap_workers(args)
    assert args.num_workers == 2 and len(session.workarounds) == 1
