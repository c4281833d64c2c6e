"""Durable run files: atomic fsynced writes, checkpoints read without running code, and the
temporaries of a killed writer removed.

A write goes to ``.NAME.<random>.tmp`` beside ``NAME``, is fsynced, renamed over ``NAME``, and
the folder is fsynced: a crash or ``kill -9`` at any moment leaves the old file or the new one,
never a cut one, and a power cut after the rename keeps the new one. A killed writer leaves
its temporary behind; :func:`remove_stale_temporaries` clears them when the folder is reopened.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokensieve.errors import TokensieveError


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(temporary_path)``, then fsync, rename over ``path`` and fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`. Save only tensors and plain Python values
    (dicts, lists, tuples, str, numbers, None): :func:`load_checkpoint` refuses anything else."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path, hint: str = "") -> Any:
    """A file written by :func:`atomic_torch_save`, on the CPU. ``weights_only=True``: a crafted
    file cannot run code while it loads. Anything unreadable raises one :class:`TokensieveError`
    line naming the file (and ``hint``, what to do about it)."""
    then = f"; {hint}" if hint else ""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TokensieveError(f"cannot resume from {path}: it holds Python objects other than tensors and plain "
                              f"values, which tokensieve never loads (they could run code){then}") from None
    except Exception as err:  # truncated, foreign or unreadable: the same thing to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TokensieveError(f"cannot resume from {path}: {type(err).__name__}: {reason}{then}") from None


def remove_stale_temporaries(folder: str | Path, name: str = "*") -> None:
    """Delete the ``.NAME.*.tmp`` files a killed :func:`atomic_write` left in ``folder`` (only
    those of file ``name``, if given). Call it when a run folder is reopened, before anything
    writes there."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)
