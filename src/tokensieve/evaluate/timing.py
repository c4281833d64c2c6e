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
def repeated_timings(fn: Callable[[], object], repeats: int, warmup: int = 1,
                     sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``fn()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return times


@torch.no_grad()
def alternating_timings(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` runs of every function of ``variants``, run in turn after
    ``warmup`` untimed runs of each; ``sync`` waits for the device before and after each run."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
    return times


def alternate_timings(full: Callable[[], object], pruned: Callable[[], object], repeats: int,
                      warmup: int = 1, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """``{"full": [...], "pruned": [...]}``: :func:`alternating_timings` of the two."""
    return alternating_timings({"full": full, "pruned": pruned}, repeats, warmup, sync)


@torch.no_grad()
def scoring_shares(run: Callable[[], object], handle, repeats: int,
                   sync: Callable[[], None] = lambda: None) -> list[float]:
    """Share of each of ``repeats`` runs of ``run()`` (a pruned pass of ``handle``'s model) spent
    choosing tokens. Measured in runs of their own, with the scoring blocks waiting for the device
    at their edges (``handle.scoring_sync``): on a GPU that wait stalls the queue, so these runs
    are not the ones whose latency is reported."""
    shares = []
    handle.scoring_sync = sync
    try:
        for _ in range(repeats):
            handle.scoring_seconds = 0.0
            sync()
            started = time.perf_counter()
            run()
            sync()
            shares.append(handle.scoring_seconds / (time.perf_counter() - started))
    finally:
        handle.scoring_sync = lambda: None
    return shares
