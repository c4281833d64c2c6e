"""Interrupted work resumes exactly: Ctrl-C saves the step it ends (exit code 130, one line
saying where and how to continue), and after ``kill -9`` at any point a rerun gives the
weights and report figures of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tokensieve.evaluate.scorer as scorer
import tokensieve.testbed.train as testbed_train
from tokensieve.cli import main
from tokensieve.clip import train as clip_train
from tokensieve.config import save_config
from tokensieve.data.vqa_files import VQAItem
from tokensieve.evaluate.sample_log import SampleLog
from tokensieve.interrupt import Interrupted
from tokensieve.train.trainer import TwoStageTrainer, train_two_stage

from tiny_two_stage import tiny_config

# Validation (and so best/) at steps 3 and 6, checkpoints every 2: a stop at step 5 is between both.
SCHEDULE = {"optim": {"steps": 6, "batch_size": 4}, "validation": {"every": 3, "samples": 8},
            "run": {"checkpoint_every": 2, "threads": 1}}


def _config_file(tiny_llava_dir, folder: Path) -> Path:
    path = folder / "tiny.yaml"
    save_config(tiny_config(tiny_llava_dir, **SCHEDULE), path)
    return path


@pytest.fixture(scope="module")
def straight_run(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train_two_stage(tiny_config(tiny_llava_dir, **SCHEDULE), out, progress=False)
    return out


def _same_parts(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _same_run(resumed: Path, straight: Path) -> None:
    assert _same_parts(resumed / "parts.safetensors", straight / "parts.safetensors")
    assert _same_parts(resumed / "best" / "parts.safetensors", straight / "best" / "parts.safetensors")
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert not [p.name for p in [*resumed.iterdir(), *(resumed / "best").iterdir()] if p.name.endswith(".tmp")]


@pytest.fixture(autouse=True)
def _ctrl_c_delivered():
    """SIGINT handled as Python handles it by default, also where the test run inherited it ignored (a
    job a non-interactive shell started in the background): these tests send it as Ctrl-C would."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_at(calls: dict, n: int):
    """Count calls; the ``n``-th sends this process SIGINT, as Ctrl-C does."""
    calls["n"] += 1
    if calls["n"] == n:
        os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_train_saves_that_step_and_resumes_exactly(tiny_llava_dir, tmp_path, straight_run, capsys,
                                                             monkeypatch):
    config, out, calls = _config_file(tiny_llava_dir, tmp_path), tmp_path / "run", {"n": 0}
    original = TwoStageTrainer.train_step

    def step(self, *args):
        _sigint_at(calls, 5)  # mid-step: the step still ends, then the run stops
        return original(self, *args)

    monkeypatch.setattr(TwoStageTrainer, "train_step", step)
    assert main(["train", str(config), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"tokensieve: interrupted at step 5 of 6, saved in {out}; rerun it with --resume to continue"
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 5  # not a periodic checkpoint
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is ordinary again
    monkeypatch.setattr(TwoStageTrainer, "train_step", original)
    assert main(["train", str(config), "--out", str(out), "--resume"]) == 0
    _same_run(out, straight_run)


def test_ctrl_c_in_testbed_train_saves_that_step_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    from tiny_testbed import TINY

    cfg = testbed_train.TestbedTrainConfig(**{**TINY, "tower_steps": 2, "llm_steps": 4})  # checkpoints every 2
    whole = testbed_train.train_testbed(tmp_path / "whole", cfg)
    real_lr_at, calls = testbed_train.lr_at, {"n": 0}

    def lr_at(step, total, *args):
        if total == cfg.llm_steps and step == 2:  # the third LLM step
            _sigint_at(calls, 1)
        return real_lr_at(step, total, *args)

    monkeypatch.setattr(testbed_train, "lr_at", lr_at)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at llm step 3, saved in .*train_state.pt; "
                                                r"rerun the same command to continue"):
        testbed_train.train_testbed(tmp_path / "cut", cfg)
    assert torch.load(tmp_path / "cut" / testbed_train.STATE_FILE, weights_only=True)["state"]["step"] == 3
    monkeypatch.undo()
    resumed = testbed_train.train_testbed(tmp_path / "cut", cfg)
    assert _same_parts(resumed / "model.safetensors", whole / "model.safetensors")


def test_ctrl_c_in_clip_train_tiny_saves_that_step_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    cfg = clip_train.TinyTrainConfig(steps=3, batch_size=8, warmup=1, save_every=2, eval_images=18)
    straight = clip_train.train_tiny_clip(tmp_path / "straight", cfg, progress=False)
    original, calls = clip_train.training_pair, {"n": 0}

    def pair(index, rng):
        if index == 0:  # the first step
            _sigint_at(calls, 1)
        return original(index, rng)

    monkeypatch.setattr(clip_train, "training_pair", pair)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 1 of 3"):
        clip_train.train_tiny_clip(tmp_path / "cut", cfg, progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["step"] == 1
    assert clip_train.train_tiny_clip(tmp_path / "cut", cfg, progress=False).read_bytes() == straight.read_bytes()


def _run_killed(code: str, argv: list[str]) -> None:
    """Run ``tokensieve ARGV`` in a fresh interpreter after ``code`` (which arranges its own
    SIGKILL) and check that it was killed."""
    driver = f"import os, signal, sys\n{code}\nfrom tokensieve.cli import main\nsys.exit(main({argv!r}))\n"
    done = subprocess.run([sys.executable, "-c", driver], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


# SIGKILL at the second checkpoint (step 4), its state.pt written to a temporary but not renamed yet.
KILL_IN_A_CHECKPOINT = """
real_replace, saves = os.replace, []
def replace(src, dst):
    if str(dst).endswith("state.pt"):
        saves.append(dst)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
"""


def test_kill_9_in_train_then_resume_gives_the_uninterrupted_weights(tiny_llava_dir, tmp_path, straight_run):
    config, out = _config_file(tiny_llava_dir, tmp_path), tmp_path / "run"
    _run_killed(KILL_IN_A_CHECKPOINT, ["train", str(config), "--out", str(out)])
    assert not (out / "done.json").exists() and list(out.glob(".state.pt.*.tmp"))  # what the kill left
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    assert main(["train", str(config), "--out", str(out), "--resume"]) == 0
    _same_run(out, straight_run)


@pytest.fixture(scope="module")
def pruner_run(tiny_llava_dir, tmp_path_factory):
    """Two steps leave the heads' last layer at zero (every token equally likely kept); random
    weights there make a keep threshold keep a different count in each row."""
    out = tmp_path_factory.mktemp("pruner") / "run"
    train_two_stage(tiny_config(tiny_llava_dir, optim={"steps": 2, "batch_size": 4}), out, progress=False)
    path = out / "best" / "parts.safetensors"
    with safe_open(path, "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    noise = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.startswith("layer_pruners.") and k.endswith(".mlp.3.weight")]:
        state[key] = 10 * torch.randn(state[key].shape, generator=noise)
    save_file(state, str(path), metadata=metadata)
    return out


def _eval_args(tiny_llava_dir, pruner_run, out: Path) -> list[str]:
    # The heads keep a count per row: the figures of the two-stage row are means over the items.
    return ["eval", "--model", str(tiny_llava_dir), "--pruner", str(pruner_run), "--head-threshold", "0.5",
            "--centres", "0.25", "--budget", "0.25", "--method", "random", "--samples", "24", "--batch-size", "4",
            "--timing-samples", "0", "--kept-examples", "1", "--out", str(out)]


def _figures(out: Path) -> dict:
    """report.json without what differs between two runs of one evaluation (date, command line)."""
    report = json.loads((out / "report.json").read_text())
    for key in ("date", "command"):
        report["meta"].pop(key)
    return report


# SIGKILL before the two-stage row's third batch is answered: its first two are in the log.
KILL_IN_THE_TWO_STAGE_ROW = """
import tokensieve.evaluate.scorer as scorer
real_predict, calls = scorer.predict, []
def predict(backbone, items, *args, **kwargs):
    calls.append(len(items))
    if len(calls) == 6 + 6 + 3:  # the baseline (6 batches), random (6), then ours
        os.kill(os.getpid(), signal.SIGKILL)
    return real_predict(backbone, items, *args, **kwargs)
scorer.predict = predict
"""


def test_kill_9_in_eval_then_rerun_gives_the_uninterrupted_report(tiny_llava_dir, pruner_run, tmp_path):
    assert main(_eval_args(tiny_llava_dir, pruner_run, tmp_path / "whole")) == 0
    _run_killed(KILL_IN_THE_TWO_STAGE_ROW, _eval_args(tiny_llava_dir, pruner_run, tmp_path / "resumed"))
    lines = (tmp_path / "resumed" / "samples.jsonl").read_text().splitlines()
    assert sum('"run": "two_stage' in line for line in lines) == 8 and not (tmp_path / "resumed" / "report.json").exists()
    assert main(_eval_args(tiny_llava_dir, pruner_run, tmp_path / "resumed")) == 0
    whole, resumed = _figures(tmp_path / "whole"), _figures(tmp_path / "resumed")
    learned = next(r for r in resumed["rows"] if r["method"] == "two_stage")
    assert any(isinstance(n, float) for n in learned["visual_tokens_per_stage"].values())  # a mean over rows
    assert resumed == whole


def test_ctrl_c_in_eval_keeps_the_scored_items_and_says_how_to_continue(tiny_llava_dir, pruner_run, tmp_path,
                                                                        capsys, monkeypatch):
    real_predict, calls = scorer.predict, {"n": 0}

    def predict(*args, **kwargs):
        _sigint_at(calls, 3)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(scorer, "predict", predict)
    out = tmp_path / "cut"
    assert main(_eval_args(tiny_llava_dir, pruner_run, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"tokensieve: interrupted while scoring none; the items scored so far are kept in "
                   f"{out / 'samples.jsonl'}; rerun the same command to continue")
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1 + 2 * 4


def test_reopening_a_sample_log_drops_a_cut_line_and_a_killed_repairs_temporary(tmp_path):
    fingerprint = {"model": "m"}
    log = SampleLog(tmp_path, fingerprint)
    item = VQAItem("q1", "what colour?", ["red"], "colour", read_image=lambda: None)
    log.append("none", [item], ["red"], [1.0], kept=[{"s": 3}])
    with open(log.path, "a") as f:
        f.write('{"run": "none", "id": "q2", "pre')  # cut by a kill mid-write
    (tmp_path / ".samples.jsonl.x1y2.tmp").write_text("a repair that was killed")
    reopened = SampleLog(tmp_path, fingerprint)
    assert list(reopened.done("none")) == ["q1"] and reopened.done("none")["q1"]["kept"] == {"s": 3}
    assert log.path.read_text().endswith('"kept": {"s": 3}}\n')
    assert [p.name for p in tmp_path.iterdir()] == ["samples.jsonl"]


def test_a_demo_in_a_new_dated_folder_says_to_continue_with_that_folder(tmp_path, monkeypatch):
    import tokensieve.demo as demo

    def interrupted_training(cfg, run, **kwargs):
        raise Interrupted(f"interrupted at step 3 of 300, saved in {run}", "rerun the same command to continue")

    monkeypatch.setattr(demo, "default_folder", lambda: tmp_path / "tokensieve-demo-1")
    monkeypatch.setattr(demo, "train_two_stage", interrupted_training)
    with pytest.raises(Interrupted) as stopped:
        demo.run_demo()
    assert stopped.value.resume == f"rerun it with --out {tmp_path / 'tokensieve-demo-1'} to continue"


def test_ctrl_c_in_a_search_says_a_rerun_continues_it(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    from test_search import study_of, write_search

    path, out, calls = write_search(tmp_path, tiny_llava_dir), tmp_path / "out", {"n": 0}
    original = TwoStageTrainer.train_step

    def step(self, *args):
        _sigint_at(calls, 1)
        return original(self, *args)

    monkeypatch.setattr(TwoStageTrainer, "train_step", step)
    assert main(["search", str(path), "--trials", "1", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tokensieve: search interrupted in trial 0; rerun the same command to continue (finished trials stay in "
        "the study)")
    monkeypatch.undo()
    assert main(["search", str(path), "--trials", "1", "--out", str(out)]) == 0
    assert [t.state.name for t in study_of(path, out).trials] == ["FAIL", "COMPLETE"]
