"""A two-stage training run's folder: checking it, saving and loading the state that resumes
a run exactly, and the marks of a finished run.

``config.yaml`` (resolved), ``state.pt`` (everything needed to resume exactly: parts,
optimizer, step, RNG; tensors and plain values only, loaded with ``weights_only``),
``parts.safetensors`` and ``config.yaml`` of the latest pruner, ``best/`` (the pruner with the
best validation accuracy), ``log.jsonl`` and ``done.json`` (a finished run). Every file is
written atomically and fsynced.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from tokensieve.checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint
from tokensieve.config import load_config, to_dict
from tokensieve.errors import TokensieveError
from tokensieve.pruner.two_stage import CONFIG_FILE, TwoStagePruner
from tokensieve.train.two_stage_config import TwoStageConfig

STATE_FILE = "state.pt"
DONE_FILE = "done.json"
LOG_FILE = "log.jsonl"


def check_run_folder(out: Path, cfg: TwoStageConfig, resume: bool) -> None:
    """Refuse a folder holding a (finished) run unless resuming, and a resume with a different config."""
    saved = out / CONFIG_FILE
    if (out / DONE_FILE).exists() and not resume:
        raise TokensieveError(f"{out} holds a finished run; choose another folder")
    if saved.exists() and not resume:
        raise TokensieveError(f"{out} already holds a run; pass --resume to continue it or choose another folder")
    if resume and saved.exists():
        before = _flatten(to_dict(load_config(TwoStageConfig, saved)))
        now = _flatten(to_dict(cfg))
        differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if differ:
            raise TokensieveError(f"cannot resume {out}: its run had a different config "
                                  f"({', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in differ[:4])})")
    # The folder itself is made by the first file written (the config), once every setting
    # that needs the backbone has been checked: a refused run leaves no folder behind.


def save_run_state(out: Path, parts: TwoStagePruner, optimizer: torch.optim.Optimizer, step: int,
                   best: float | None) -> None:
    """``state.pt`` and the latest pruner (``parts.safetensors`` + ``config.yaml``) after ``step``."""
    atomic_torch_save({"parts": parts.state_dict(), "optimizer": optimizer.state_dict(),
                       "step": step, "best": best, "signature": parts.signature,
                       "rng": rng_state()}, out / STATE_FILE)
    parts.save_pretrained(out, {"step": str(step)})


def load_run_state(out: Path, parts: TwoStagePruner, optimizer: torch.optim.Optimizer) -> tuple[int, float | None]:
    """Restore ``parts``, ``optimizer`` and every RNG from ``out/state.pt``; returns its step and best score."""
    saved = load_checkpoint(out / STATE_FILE, "start the run again in a new folder")
    try:
        if saved["signature"] != parts.signature:
            raise TokensieveError(f"cannot resume {out}: it was trained on a different backbone "
                                  f"({saved['signature']}; this one is {parts.signature})")
        parts.load_state_dict(saved["parts"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        return saved["step"], saved["best"]
    except TokensieveError:
        raise
    except Exception as err:  # a foreign file means the same thing to the user
        first_line = (str(err).splitlines() or [""])[0]
        raise TokensieveError(f"cannot resume from {out / STATE_FILE}: "
                              f"{type(err).__name__}: {first_line}") from None


def mark_done(out: Path, steps: int, best: float | None) -> None:
    """``done.json``: a finished run of ``steps`` steps and its best validation accuracy."""
    atomic_write_text(out / DONE_FILE, json.dumps({"steps": steps, "best_val_accuracy": best}) + "\n")


def rng_state() -> dict:
    """Every random generator a step draws from, as tensors and plain values (``weights_only`` loads them)."""
    numpy = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key": (624,) uint32, "pos"}, ...}
    numpy["state"] = {"key": numpy["state"]["key"].tolist(), "pos": numpy["state"]["pos"]}
    return {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(saved: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(saved["torch"])
    numpy = dict(saved["numpy"])
    numpy["state"] = {"key": np.asarray(numpy["state"]["key"], dtype=np.uint32), "pos": numpy["state"]["pos"]}
    np.random.set_state(numpy)
    random.setstate(saved["python"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def drop_log_rows_after(path: Path, step: int) -> None:
    """Keep the rows of ``log.jsonl`` up to ``step`` (a resumed run logs the later steps again;
    a row cut by a kill goes too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(kept))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
