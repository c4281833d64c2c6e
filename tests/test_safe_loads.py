"""A crafted state file in a run folder never runs its code: every resume path loads with
``weights_only=True`` and ends with one line naming the file (exit code 2)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from tokensieve.checkpoint import load_checkpoint
from tokensieve.cli import main
from tokensieve.config import save_config
from tokensieve.errors import TokensieveError
from tokensieve.train.trainer import TwoStageTrainer

from tiny_two_stage import tiny_config

SRC = Path(__file__).resolve().parent.parent / "src" / "tokensieve"


class Payload:
    """Unpickling calls ``os.makedirs(marker)``: the marker folder appears if the load runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def craft(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "step": 1}, path)
    return path


def test_the_crafted_file_would_run_code_if_unpickled(tmp_path):
    marker = tmp_path / "ran"
    torch.load(craft(tmp_path / "state.pt", marker), weights_only=False)
    assert marker.is_dir()  # so the tests below, where it stays absent, can fail


def test_load_checkpoint_refuses_it_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = craft(tmp_path / "state.pt", marker)
    with pytest.raises(TokensieveError) as err:
        load_checkpoint(path, "delete it")
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and message.endswith("; delete it")


def test_plain_values_and_tensors_load(tmp_path):
    torch.save({"step": 3, "rng": (3, (1, 2), None), "w": torch.ones(2)}, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert loaded["step"] == 3 and loaded["rng"] == (3, (1, 2), None) and torch.equal(loaded["w"], torch.ones(2))


def test_a_saved_two_stage_state_loads_with_weights_only(tiny_llava_dir, tmp_path):
    trainer = TwoStageTrainer(tiny_config(tiny_llava_dir, optim={"steps": 1}), tmp_path / "run", progress=False)
    trainer._save_state()
    saved = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert set(saved["rng"]) == {"torch", "numpy", "python", "cuda"}


def _tiny_train_config(tiny_llava_dir, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config(tiny_llava_dir), path)
    return path


COMMANDS = {
    "train --resume": lambda d, t: (["train", str(_tiny_train_config(d, t)), "--out", str(t / "run"), "--resume"],
                                    t / "run" / "state.pt"),
    "demo": lambda d, t: (["demo", "--out", str(t / "demo"), "--set", f"model={d}", "--set", "pruner.pruning_layers=[2]"],
                          t / "demo" / "pruner" / "state.pt"),
    "testbed train": lambda d, t: (["testbed", "train", "--out", str(t / "testbed"), "--llm-layers", "2",
                                    "--mention-layer", "1", "--relation-layer", "2"],
                                   t / "testbed" / "train_state.pt"),
    "clip-benchmark train-tiny": lambda d, t: (["clip-benchmark", "train-tiny", "--out", str(t / "clip")],
                                               t / "clip" / "state.pt"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_command_runs_a_crafted_state_file(command, tiny_llava_dir, tmp_path, capsys):
    argv, state = COMMANDS[command](tiny_llava_dir, tmp_path)
    marker = tmp_path / "ran"
    craft(state, marker)
    assert main(argv) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokensieve: error: cannot resume from ")
    assert str(state) in err


def test_nothing_in_the_package_unpickles():
    unsafe = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    found = [f"{path.relative_to(SRC)}:{n}" for path in SRC.rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if unsafe.search(line)]
    assert found == []
