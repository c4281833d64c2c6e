"""Alternating wall-clock timing of two variants of one computation (full vs pruned).

Running the two one after the other, repeat after repeat, lets both see the same machine
state (clock, caches, other jobs), which matters more than the number of repeats on a shared
machine. Used by ``tokensieve bench speed`` and ``tokensieve clip-benchmark speed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """What makes a timer wait for queued kernels on ``device`` (nothing to wait for on a CPU)."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


@torch.no_grad()
def alternate_timings(full: Callable[[], object], pruned: Callable[[], object], repeats: int,
                      warmup: int = 1, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` runs of ``full()`` and ``pruned()``, run alternately after
    ``warmup`` untimed runs of each; ``sync`` waits for the device before and after each run."""
    for _ in range(warmup):
        full()
        pruned()
    times: dict[str, list[float]] = {"full": [], "pruned": []}
    for _ in range(repeats):
        for name, fn in (("full", full), ("pruned", pruned)):
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
    return times
