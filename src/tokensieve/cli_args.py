"""What every ``tokensieve`` command shares when it reads its arguments: the parser class and the
argument types that refuse bad values there, before any work starts, in one line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr (exit status 2), like
    every other tokensieve error; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int, wording: str):
    """An argparse type: an integer of at least ``minimum`` (``wording`` names it in the error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text}")
        return value
    parse.__name__ = "integer"  # argparse's word for text that is no number at all
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "0 or a positive integer")


def out_folder(text: str) -> Path:
    """An argparse type: a folder results can be written into, existing or not (it is not created here)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    nearest = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be a folder: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable here ({nearest} is not)")
    return path


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated argument (``"fastv, divprune"`` -> ``["fastv", "divprune"]``), blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


MEMORY_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                "TB": 10**12}


def memory_size(text: str) -> int:
    """An argparse type: a positive amount of memory with its unit (``24GiB``, ``512MiB``, ``1.5GB``), in bytes."""
    number = text.rstrip("KMGTiB")
    unit = text[len(number):]
    try:
        size = float(number) * MEMORY_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of memory: give a number and one of "
                                         f"{', '.join(MEMORY_UNITS)} (24GiB)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be a positive amount of memory, got {text}")
    return int(size)
