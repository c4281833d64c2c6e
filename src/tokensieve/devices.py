"""Device names: which ones tokensieve reads, and whether this machine has the one asked for."""

from __future__ import annotations

import re

from tokensieve.errors import TokensieveError

DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?|mps")


def check_device_name(device: str, what: str = "device") -> None:
    """Refuse a name that is no device (``tpu``, ``gpu``); says nothing of this machine, so a
    config naming ``cuda`` still reads on a laptop."""
    if not DEVICE_NAME.fullmatch(str(device)):
        raise TokensieveError(f"{what} {device!r} is not a device; write cpu, cuda, cuda:<i> or mps")


def require_device(device: str, what: str = "device") -> None:
    """Refuse a device this machine lacks (``cuda`` without a GPU, ``cuda:3`` with two), before
    any work is done on it."""
    import torch

    check_device_name(device, what)
    kind, _, index = str(device).partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TokensieveError(f"{what} {device}: no CUDA device is available here")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise TokensieveError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise TokensieveError(f"{what} {device}: no MPS device is available here")
