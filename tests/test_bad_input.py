"""Bad input to every command ends in one line naming the problem and exit status 2, before any
heavy work: no traceback, nothing silently accepted, no run folder left behind.

Each row of ``CASES`` is ``(argv, words)``: ``argv`` built from the files of ``bad``, ``words`` a
part of the one line on stderr. Commands run in-process from an empty working folder, which must
stay empty (a refused command writes no default run, demo or search folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tokensieve.attach import attach
from tokensieve.backbones.llava_prompt import encode
from tokensieve.backbones.shipped import shipped_testbed
from tokensieve.cli import main
from tokensieve.errors import TokensieveError
from tokensieve.train.two_stage_config import OptimConfig, RunConfig

SRC = Path(__file__).resolve().parent.parent / "src" / "tokensieve"
TRAIN_CONFIG = str(SRC / "configs" / "two_stage_testbed.yaml")
SEARCH_CONFIG = str(SRC / "configs" / "search_testbed.yaml")
CLIP = ["--num_workers", "0", "--no_amp", "--quiet"]


class Payload:
    """Unpickling calls ``os.makedirs(marker)``: the marker folder appears if a load runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _model_folder(path: Path, weights: object) -> Path:
    """The shipped testbed's config beside a ``pytorch_model.bin``: ``weights`` saved by torch, or
    these bytes."""
    path.mkdir()
    shutil.copy(shipped_testbed() / "config.json", path)
    if isinstance(weights, bytes):
        (path / "pytorch_model.bin").write_bytes(weights)
    else:
        torch.save(weights, path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bad_input")
    (root / "file.txt").write_text("not a folder\n")
    (root / "folder").mkdir()
    (root / "garbage.yaml").write_bytes(bytes(range(256)) * 2)
    (root / "syntax.yaml").write_text("optim:\n  steps: [1, 2\nrun: {}\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "empty.yaml").write_text("")
    (root / "junk.safetensors").write_bytes(b"junk")
    (root / "foreign").mkdir()
    torch.save({"foo": 1}, root / "foreign" / "state.pt")
    (root / "wds" / "test").mkdir(parents=True)  # enough of a webdataset for the model to be loaded first
    (root / "wds" / "test" / "nshards.txt").write_text("1\n")
    return SimpleNamespace(
        root=root, file=str(root / "file.txt"), folder=str(root / "folder"), garbage=str(root / "garbage.yaml"),
        syntax=str(root / "syntax.yaml"), list=str(root / "list.yaml"), empty=str(root / "empty.yaml"),
        junk=str(root / "junk.safetensors"), foreign=str(root / "foreign"), wds=str(root / "wds"),
        missing=str(root / "no" / "such" / "thing"), under_file=str(root / "file.txt" / "out"),
        marker=root / "code_ran",
        pickled_code=str(_model_folder(root / "pickled_code", {"w": Payload(root / "code_ran")})),
        hollow=str(_model_folder(root / "hollow", {"a": torch.zeros(1)})),
        garbage_bin=str(_model_folder(root / "garbage_bin", b"garbage, not a checkpoint")))


def _train(*extra: str) -> list[str]:
    return ["train", TRAIN_CONFIG, *extra]


def _clip_eval(bad, model: str, pretrained: str, root: str) -> list[str]:
    return ["clip-benchmark", "eval", *CLIP, "--model", model, "--pretrained", pretrained,
            "--dataset", "wds/shapes_classification", "--dataset_root", root, "--output", str(bad.root / "r.json")]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")

CASES = [
    # the list
    pytest.param(lambda b: ["train", b.folder], "is a folder, not a YAML file", id="config-is-a-folder"),
    pytest.param(lambda b: _train("--set", "optim.batch_size=0"), "batch_size 0 must be >= 1", id="batch-size-0"),
    pytest.param(lambda b: _train("--set", "validation.every=0"), "every 0 must be >= 1", id="validation-every-0"),
    pytest.param(lambda b: _train("--set", "run.checkpoint_every=0"), "checkpoint_every 0 must be >= 1",
                 id="checkpoint-every-0"),
    pytest.param(lambda b: _train("--set", "validation.samples=0"), "samples 0 must be >= 1",
                 id="validation-samples-0"),
    pytest.param(lambda b: _train("--set", "run.device=tpu"), "'tpu' is not a device", id="device-tpu"),
    pytest.param(lambda b: _train("--set", "run.threads=0"), "threads 0 must be >= 1", id="threads-0"),
    pytest.param(lambda b: _train("--set", "optim.steps=-1"), "steps -1 must be >= 1", id="steps-negative"),
    pytest.param(lambda b: _clip_eval(b, "tokensieve-tiny-clip", "tokensieve", b.missing + "/{dataset}"),
                 "no webdataset at", id="clip-missing-dataset-root"),
    pytest.param(lambda b: _clip_eval(b, "no-such-model", "x", b.wds), "'no-such-model' is no open_clip model",
                 id="clip-unknown-model"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--out", b.file],
                 "is a file, not a folder", id="eval-out-is-a-file"),
    pytest.param(lambda b: _train("--out", b.file), "is a file, not a folder", id="train-out-is-a-file"),
    pytest.param(lambda b: ["search", SEARCH_CONFIG, "--trials", "1", "--out", b.file], "is a file, not a folder",
                 id="search-out-is-a-file"),
    pytest.param(lambda b: ["clip-benchmark", "write-data", "--out", b.file], "is a file, not a folder",
                 id="write-data-out-is-a-file"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--model", b.pickled_code],
                 "not a plain file of tensors", id="model-bin-with-pickled-code"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--model", b.garbage_bin],
                 "not a plain file of tensors", id="model-bin-garbage"),
    pytest.param(lambda b: _clip_eval(b, "tokensieve-tiny-clip", b.junk, b.wds), "is not a tiny CLIP checkpoint",
                 id="clip-pretrained-junk"),
    pytest.param(lambda b: ["clip-benchmark", "train-tiny", "--out", b.foreign], "is not a tiny CLIP training state",
                 id="train-tiny-foreign"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--timing-samples", "-1"],
                 "--timing-samples: must be 0 or a positive integer", id="timing-samples-negative"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--kept-examples", "-1"],
                 "--kept-examples: must be 0 or a positive integer", id="kept-examples-negative"),
    pytest.param(lambda b: ["train", b.syntax], "not valid YAML: expected ',' or ']'", id="yaml-syntax"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--model", b.missing], "there is no such folder",
                 id="model-path-missing"),
    # config files and --set
    pytest.param(lambda b: ["train", b.garbage], "is not text", id="config-binary-garbage"),
    pytest.param(lambda b: ["train", b.list], "must hold a mapping", id="config-a-list"),
    pytest.param(lambda b: ["train", b.missing], "does not exist", id="config-missing"),
    pytest.param(lambda b: ["train", b.empty, "--set", "optim.batch_size=-2"], "batch_size -2 must be >= 1",
                 id="empty-config-bad-set"),
    pytest.param(lambda b: _train("--set", "optim.nosuch=1"), "unknown config key 'optim.nosuch'",
                 id="set-unknown-key"),
    pytest.param(lambda b: _train("--set", "optim.steps"), "malformed override", id="set-no-value"),
    pytest.param(lambda b: _train("--set", "optim.steps=[1, 2"), "the value is not valid YAML", id="set-bad-yaml"),
    pytest.param(lambda b: _train("--set", "optim.steps=abc"), "'optim.steps' expects int", id="set-wrong-type"),
    pytest.param(lambda b: _train("--set", "merger.variant=bogus"), "must be one of", id="set-bad-choice"),
    pytest.param(lambda b: _train("--set", "optim.lr_token_merger=-1"), "lr_token_merger -1.0 must be >= 0",
                 id="negative-lr"),
    pytest.param(lambda b: _train("--set", "schedule.anneal_fraction=1.5"), "anneal_fraction 1.5 is not in [0, 1]",
                 id="fraction-above-1"),
    pytest.param(lambda b: _train("--set", "loss.task=-1"), "task -1.0 must be >= 0", id="negative-loss-weight"),
    pytest.param(lambda b: _train("--set", "merger.num_heads=0"), "num_heads 0 must be >= 1", id="no-heads"),
    pytest.param(lambda b: _train("--set", "merger.target_merge_tokens=0"), "target_merge_tokens 0 must be >= 1",
                 id="no-centres"),
    pytest.param(lambda b: _train("--set", "pruner.pruning_layers=[0]"), "give decoder layers >= 1",
                 id="pruning-layer-0"),
    pytest.param(lambda b: _train("--set", "data.kind=instruct"), "needs data.path and data.image_folder",
                 id="instruct-without-data"),
    pytest.param(lambda b: _train("--set", "run.device=cuda"), "no CUDA device is available", id="device-cuda",
                 marks=NO_CUDA),
    # eval
    pytest.param(lambda b: ["eval", "--method", "nosuch", "--budget", "0.5"], "unknown method 'nosuch'",
                 id="eval-unknown-method"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "abc"], "cannot read budget 'abc'",
                 id="eval-budget-text"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "2.5"], "budget ratio 2.5 is not in (0, 1]",
                 id="eval-budget-above-1"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0"], "keep at least one token",
                 id="eval-budget-0"),
    pytest.param(lambda b: ["eval", "--method", "fastv"], "--method needs --budget", id="eval-method-without-budget"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--centres", "0.25"],
                 "--centres sets the tokens the trained pruner sends into the LLM: give it with --pruner",
                 id="eval-centres-without-pruner"),
    pytest.param(lambda b: ["eval", "--pruner", b.missing, "--method", "fastv", "--budget", "0.5", "--match", "tokens"],
                 "--match with --pruner matches the methods to the pruner at each --centres value: drop --budget",
                 id="eval-match-to-pruner-with-budget"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--method", "fastv"], "--mode origin measures",
                 id="eval-origin-with-method"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--head-threshold", "0.5"],
                 "give it with --pruner", id="eval-head-threshold-without-pruner"),
    pytest.param(lambda b: ["eval", "--pruner", b.folder], "is not a trained pruner", id="eval-pruner-not-a-run"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--samples", "0"], "--samples: must be a positive integer",
                 id="eval-samples-0"),
    pytest.param(lambda b: ["eval", "--mode", "bogus"], "argument --mode: invalid choice", id="eval-mode-bogus"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--max-new-tokens", "0"],
                 "--max-new-tokens: must be a positive integer", id="eval-max-new-tokens-0"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--dataset", b.folder, "--spec", b.garbage],
                 "is not text", id="eval-spec-garbage"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--dataset", b.folder, "--spec", b.empty],
                 "must be a mapping", id="eval-spec-empty"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--questions", b.file], "needs --questions FILE, --images",
                 id="eval-questions-alone"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--model", b.file], "it has no config.json",
                 id="eval-model-is-a-file"),
    pytest.param(lambda b: ["eval", "--mode", "origin", "--model", b.hollow],
                 "of the model's weights are not in its checkpoint", id="eval-model-weights-missing"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--samples", "2", "--site", "llm.99"],
                 "llm.99 is past its depth", id="eval-site-beyond-the-llm"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--samples", "2", "--site", "llm.0"],
                 "fastv needs text_attention, which llm.0 does not provide", id="eval-signal-missing-at-site"),
    pytest.param(lambda b: ["eval", "--method", "cdpruner", "--budget", "0.5", "--samples", "2"],
                 "cdpruner needs a CLIP text encoder", id="eval-cdpruner-without-text-encoder"),
    pytest.param(lambda b: ["eval", "--method", "pyramiddrop", "--budget", "0.5", "--samples", "2",
                            "--param", "pyramiddrop.layers=[2,4,9]"],
                 "stage layers 2, 4, 9 go past the LLM's 8 layers", id="eval-schedule-past-the-depth"),
    pytest.param(lambda b: ["eval", "--method", "pyramiddrop", "--budget", "64", "--samples", "2"],
                 "pyramiddrop's budget is lambda", id="eval-pyramiddrop-count-budget"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--samples", "2", "--param", "fastv"],
                 "write METHOD.KEY=VALUE", id="eval-param-unreadable"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--samples", "2", "--param", "dart.k=3"],
                 "'dart' is not among --method fastv", id="eval-param-of-another-method"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--samples", "2", "--param", "fastv.k=3"],
                 "unknown parameter(s) k for method 'fastv'", id="eval-param-unknown"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--site", "banana"],
                 "unknown site 'banana'", id="eval-site-bogus"),
    pytest.param(lambda b: ["eval", "--method", "fastv", "--budget", "0.5", "--out", b.under_file],
                 "cannot be a folder", id="eval-out-under-a-file"),
    # testbed
    pytest.param(lambda b: ["testbed", "train", "--out", b.file], "is a file, not a folder", id="testbed-out-file"),
    pytest.param(lambda b: ["testbed", "train", "--out", b.missing, "--tower-steps", "0"],
                 "--tower-steps: must be a positive integer", id="testbed-steps-0"),
    pytest.param(lambda b: ["testbed", "train", "--out", b.missing, "--llm-layers", "abc"],
                 "invalid integer value: 'abc'", id="testbed-layers-text"),
    pytest.param(lambda b: ["testbed", "train", "--out", b.missing, "--llm-layers", "2", "--mention-layer", "4"],
                 "mention_layer 4", id="testbed-lookup-beyond-the-llm"),
    pytest.param(lambda b: ["testbed", "train"], "the following arguments are required: --out", id="testbed-no-out"),
    pytest.param(lambda b: ["testbed", "eval", "--batch-size", "0"], "--batch-size: must be a positive integer",
                 id="testbed-eval-batch-0"),
    pytest.param(lambda b: ["testbed", "eval", "--model", b.hollow], "weights are not in", id="testbed-eval-hollow"),
    # demo (each refused before its training starts)
    pytest.param(lambda b: ["demo", "--out", b.file], "is a file, not a folder", id="demo-out-file"),
    pytest.param(lambda b: ["demo", "--set", "optim.nosuch=1"], "unknown config key", id="demo-set-unknown"),
    pytest.param(lambda b: ["demo", "--budget", "0.5,zz"], "cannot read budget 'zz'", id="demo-bad-budget"),
    pytest.param(lambda b: ["demo", "--budget", ","], "--budget needs ratios", id="demo-no-budget"),
    pytest.param(lambda b: ["demo", "--samples", "0"], "--samples: must be a positive integer", id="demo-samples-0"),
    # bench
    pytest.param(lambda b: ["bench", "speed", "--device", "tpu"], "'tpu' is not a device", id="bench-device-tpu"),
    pytest.param(lambda b: ["bench", "speed", "--budget", "64"], "takes budget ratios", id="bench-speed-count"),
    pytest.param(lambda b: ["bench", "speed", "--method", "nosuch"], "unknown method", id="bench-speed-method"),
    pytest.param(lambda b: ["bench", "speed", "--repeats", "0"], "--repeats: must be a positive integer",
                 id="bench-speed-repeats-0"),
    pytest.param(lambda b: ["bench", "speed", "--shape", "llava-7b"], "is a 7B model", id="bench-7b-on-cpu"),
    pytest.param(lambda b: ["bench", "capacity", "--memory-limit", "24"], "'24' is not an amount of memory",
                 id="bench-capacity-no-unit"),
    pytest.param(lambda b: ["bench", "capacity", "--memory-limit", "0GiB"], "must be a positive amount of memory",
                 id="bench-capacity-zero"),
    pytest.param(lambda b: ["bench", "capacity", "--memory-limit", "1GiB", "--budget", "64"], "takes budget ratios",
                 id="bench-capacity-count"),
    pytest.param(lambda b: ["bench", "capacity", "--memory-limit", "1GiB", "--shape", "qwen2.5-vl-7b"],
                 "is a 7B model", id="bench-capacity-7b-on-cpu"),
    pytest.param(lambda b: ["bench", "train", "--shape", "cpu", "--device", "cpu", "--set", "optim.batch_size=0"],
                 "batch_size 0 must be >= 1", id="bench-train-bad-set"),
    pytest.param(lambda b: ["bench", "train", b.garbage, "--shape", "cpu", "--device", "cpu"], "is not text",
                 id="bench-train-garbage-config"),
    pytest.param(lambda b: ["bench", "train", "--steps", "0"], "--steps: must be a positive integer",
                 id="bench-train-steps-0"),
    # search
    pytest.param(lambda b: ["search", SEARCH_CONFIG, "--trials", "0"], "--trials: must be a positive integer",
                 id="search-trials-0"),
    pytest.param(lambda b: ["search", b.garbage, "--trials", "1"], "is not text", id="search-garbage"),
    pytest.param(lambda b: ["search", TRAIN_CONFIG, "--trials", "1"], "unknown config key 'model'",
                 id="search-given-a-training-config"),
    # clip-benchmark
    pytest.param(lambda b: ["clip-benchmark", "eval", "--bogus"], "unrecognized arguments: --bogus",
                 id="clip-eval-unknown-flag"),
    pytest.param(lambda b: ["clip-benchmark", "eval", "--k_anchors", "x"], "invalid int value: 'x'",
                 id="clip-eval-anchors-text"),
    pytest.param(lambda b: ["clip-benchmark", "eval", "--alpha", "2"], "--alpha 2.0 is not in [0, 1]",
                 id="clip-eval-alpha"),
    pytest.param(lambda b: ["clip-benchmark", "compare", "--latency_batch", "0"],
                 "--latency_batch: must be a positive integer", id="clip-compare-batch-0"),
    pytest.param(lambda b: [*_clip_eval(b, "tokensieve-tiny-clip", b.missing, b.wds)], "no tiny CLIP checkpoint",
                 id="clip-pretrained-missing"),
    pytest.param(lambda b: [*_clip_eval(b, "tokensieve-tiny-clip", "tokensieve", b.wds)[:-1],
                            b.under_file + "/r.json"],
                 "cannot make the folder it goes in", id="clip-output-under-a-file"),
    pytest.param(lambda b: ["clip-benchmark", "train-tiny", "--out", b.file], "is a file, not a folder",
                 id="train-tiny-out-file"),
    pytest.param(lambda b: ["clip-benchmark", "train-tiny", "--out", b.missing, "--steps", "0"],
                 "--steps: must be a positive integer", id="train-tiny-steps-0"),
    pytest.param(lambda b: ["clip-benchmark", "write-data", "--out", b.under_file], "cannot be a folder",
                 id="write-data-out-under-a-file"),
    pytest.param(lambda b: ["clip-benchmark", "write-data", "--out", b.missing, "--retrieval-images", "-5"],
                 "--retrieval-images: must be a positive integer", id="write-data-negative"),
    pytest.param(lambda b: ["clip-benchmark", "speed", "--methods", "fastv"], "cannot act in a CLIP image tower",
                 id="clip-speed-llm-method"),
    pytest.param(lambda b: ["clip-benchmark", "speed", "--batch", "0"], "--batch: must be a positive integer",
                 id="clip-speed-batch-0"),
    pytest.param(lambda b: ["clip-benchmark", "speed", "--prune_layers", "0"], "block 0 has no earlier attention",
                 id="clip-speed-block-0"),
    pytest.param(lambda b: ["clip-benchmark", "speed", "--prune_layers", "a-b"], "cannot read blocks 'a-b'",
                 id="clip-speed-blocks-text"),
    pytest.param(lambda b: ["clip-benchmark", "speed", "--k_anchors", "0"], "need at least one anchor",
                 id="clip-speed-no-anchor"),
    # the command itself
    pytest.param(lambda b: [], "the following arguments are required: command", id="no-command"),
    pytest.param(lambda b: ["bogus"], "invalid choice: 'bogus'", id="unknown-command"),
    pytest.param(lambda b: ["methods", "extra"], "unrecognized arguments: extra", id="methods-extra-argument"),
]


def run_main(argv: list[str]) -> int:
    """``main(argv)``'s status; argparse's usage errors leave it through ``SystemExit``."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(("argv", "words"), CASES)
def test_bad_input_is_one_line_and_status_2(argv, words, bad, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where default run folders would appear
    status = run_main(argv(bad))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in err, err
    assert len(lines) == 1, err
    assert "error: " in lines[0] and words in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a refused command left files behind"
    assert not bad.marker.exists(), "a checkpoint ran code while being loaded"


@pytest.mark.parametrize("argv", [["eval", "--method", "fastv", "--budget", "0.5", "--out", "OUT"],
                                  ["testbed", "train", "--out", "OUT"],
                                  ["clip-benchmark", "write-data", "--out", "OUT"]])
def test_an_out_folder_that_cannot_be_written(argv, tmp_path, monkeypatch, capsys):
    """As root every folder is writable, so the refusal is simulated for the folder ``--out`` goes in."""
    real_access = os.access
    monkeypatch.setattr("tokensieve.cli_args.os.access",
                        lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    out = str(tmp_path / "out")
    assert run_main([out if a == "OUT" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{out} is not writable here ({tmp_path} is not)" in err



@pytest.fixture(scope="module")
def batch(backbone, tiny_samples):
    return encode(backbone.processor, tiny_samples[:1])


@pytest.mark.parametrize(("call", "words"), [
    pytest.param(lambda bb, _: attach(bb, [("fastv", "llm.2")]), "each stage is a (method, site, budget) triple",
                 id="attach-pair"),
    pytest.param(lambda bb, _: attach(bb, ["fastv"]), "each stage is a (method, site, budget) triple",
                 id="attach-name-list"),
    pytest.param(lambda bb, _: attach(bb, []), "nothing to attach", id="attach-empty-list"),
    pytest.param(lambda bb, _: attach(bb, "fastv", 0.5, mode="firm"), "unknown mode 'firm'", id="attach-bad-mode"),
    pytest.param(lambda bb, b: bb.forward(**b, kept=[torch.tensor([3, 500])]), "index 500 is outside the 64",
                 id="kept-out-of-range"),
    pytest.param(lambda bb, b: bb.forward(**b, kept=[torch.tensor([-1, 3])]), "index -1 is outside",
                 id="kept-negative"),
    pytest.param(lambda bb, b: bb.forward(**b, kept=[torch.tensor([5, 5, 3])]), "5 follows 5", id="kept-repeated"),
    pytest.param(lambda bb, b: bb.forward(**b, kept=[torch.tensor([5, 3])]), "3 follows 5", id="kept-unsorted"),
    pytest.param(lambda bb, b: bb.forward(**b, kept=[torch.tensor([1.0, 3.0])]), "a 1-D tensor of token indices",
                 id="kept-floats"),
    pytest.param(lambda bb, b: bb.forward(**b, kept=[torch.tensor([1]), torch.tensor([2])]),
                 "kept has 2 rows for a batch of 1", id="kept-rows"),
    pytest.param(lambda bb, _: OptimConfig(steps=-1), "steps -1 must be >= 1", id="config-steps"),
    pytest.param(lambda bb, _: RunConfig(device="gpu"), "'gpu' is not a device", id="config-device"),
])
def test_python_api_refuses_bad_input(call, words, backbone, batch):
    with pytest.raises(TokensieveError) as caught:
        call(backbone, batch)
    assert words in str(caught.value)


def test_kept_in_order_still_runs(backbone, batch):
    inputs = backbone.prepare(**batch, kept=[torch.tensor([0, 5, 63])])
    assert (inputs.input_ids == backbone.image_token_id).sum() == 3


def _parsers(parser, path=("tokensieve",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_has_help_and_no_markup():
    import argparse

    from tokensieve.cli import build_parser
    from tokensieve.integrations.clip_benchmark_cli import pruning_parser

    parsers = [*_parsers(build_parser()), (("clip-benchmark", "compare", "pruning flags"),
                                           pruning_parser("tokensieve clip-benchmark compare", compare=True))]
    for path, parser in parsers:
        assert "``" not in parser.format_help(), " ".join(path)
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{' '.join(path)} {action.option_strings or action.dest} has no help"
