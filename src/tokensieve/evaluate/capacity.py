"""Where pruning pays in serving: the largest batch whose ``generate()`` fits a memory limit, with
and without pruning, and the throughput (generated tokens per second) at that batch.

A batch fits when the peak memory of one ``generate()`` of ``new_tokens`` tokens on it is at most
the limit. The peak is measured, never estimated:
- on a GPU, ``torch.cuda.max_memory_allocated`` over the call (weights included), in this process;
  a batch that runs out of memory does not fit;
- on a CPU, whose allocator keeps no peak, the peak resident memory (``ru_maxrss``) of a fresh
  process that builds the model and runs the one call: everything a server process holds
  (interpreter, libraries, weights, activations, KV cache). The process is forked from a server
  that has only imported the libraries, so their pages count as they would in a server.

The batch is found by doubling from 1 and then halving the interval between the last batch that
fit and the first that did not, so the search assumes that a larger batch never needs less memory.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import statistics
from collections.abc import Callable

import torch
from tqdm import tqdm

from tokensieve.attach import attach
from tokensieve.evaluate.decode_speed import timed_generate
from tokensieve.evaluate.timing import synchronizer


def largest_batch(fits: Callable[[int], bool], max_batch: int) -> tuple[int, dict[int, bool]]:
    """``(largest batch b <= max_batch with fits(b), {batch: fits})`` of every batch tried; 0 when
    batch 1 does not fit. Doubles from 1, then bisects; ``fits`` must be monotone (True, then False)."""
    tried: dict[int, bool] = {}

    def probe(batch: int) -> bool:
        tried[batch] = fits(batch)
        return tried[batch]

    good, bad = 0, max_batch + 1
    batch = 1
    while batch <= max_batch and probe(batch):
        good, batch = batch, batch * 2
    bad = min(batch, bad)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if probe(middle) else (good, middle)
    return good, tried


def _generate_call(shape, method, budget: float | None, batch: int, device: str, dtype: torch.dtype,
                   site: str | None = None):
    """A function that runs ``generate(**kw)`` on ``batch`` prompts with a freshly built backbone, pruned by
    ``method`` at ``budget`` unless ``method`` is None (the function holds the backbone)."""
    torch.manual_seed(0)
    backbone = shape.build(dtype, device)
    if method is not None:
        attach(backbone, method, budget, site=site, mode="hard")
    inputs = {k: v.to(device) for k, v in shape.inputs(batch).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    def generate(**kw):
        return backbone.generate(**inputs, **kw)
    return generate


@torch.no_grad()
def _measured_peak(shape, method, budget, batch, new_tokens, device, dtype, site) -> int:
    """Build the model and run one ``generate()``; then the peak: CUDA memory allocated, or on a CPU
    this process's peak resident memory (run it in a fresh process)."""
    generate = _generate_call(shape, method, budget, batch, device, dtype, site)
    generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _fresh_processes():
    """Processes forked from a server that has imported this module and nothing more, so each starts
    with the libraries loaded (seconds saved per probe) and no model or tensor of ours."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def peak_bytes(shape, method, budget: float | None, batch: int, new_tokens: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32, site: str | None = None) -> int | None:
    """Measured peak memory (bytes) of one ``generate()`` on ``batch`` prompts (see the module
    docstring for what is counted on each device); None when the GPU ran out of memory."""
    if not device.startswith("cuda"):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=_fresh_processes()) as pool:
            return pool.submit(_measured_peak, shape, method, budget, batch, new_tokens, "cpu", dtype, site).result()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        peak = _measured_peak(shape, method, budget, batch, new_tokens, device, dtype, site)
    except torch.cuda.OutOfMemoryError:
        peak = None
    torch.cuda.empty_cache()  # the probe's model is gone with its frame: the next starts from nothing
    return peak


@torch.no_grad()
def throughput(shape, method, budget: float | None, batch: int, new_tokens: int, repeats: int,
               device: str = "cpu", dtype: torch.dtype = torch.float32, site: str | None = None) -> dict:
    """``{"generate_s", "tokens_per_s"}``: the median of ``repeats`` greedy ``generate()`` calls
    (after one warm-up) on ``batch`` prompts, and the new tokens per second that gives."""
    generate = _generate_call(shape, method, budget, batch, device, dtype, site)
    sync = synchronizer(device)
    timed_generate(generate, new_tokens, sync)
    seconds = statistics.median(timed_generate(generate, new_tokens, sync)[0] for _ in range(repeats))
    return {"generate_s": round(seconds, 4), "tokens_per_s": round(batch * new_tokens / seconds, 2)}


def capacity_rows(shape, methods: tuple, budgets: tuple[float, ...], limit_bytes: int, max_batch: int = 256,
                  new_tokens: int = 16, repeats: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  site: str | None = None, progress: bool = True) -> list[dict]:
    """One row for the unpruned model, then one per (method, budget ratio): ``largest_batch`` under
    ``limit_bytes`` (at most ``max_batch``), ``peak_memory_mb`` at that batch, ``probes``
    (``{batch: peak MiB, or None when out of memory}``), and at that batch ``generate_s`` and
    ``tokens_per_s``; pruned rows add ``throughput_ratio`` and ``batch_ratio`` to the unpruned row."""
    cases = [(None, None), *((m, b) for m in methods for b in budgets)]
    rows = []
    for method, budget in tqdm(cases, desc="capacity", unit="case", disable=not progress):
        peaks: dict[int, int | None] = {}

        def fits(batch: int) -> bool:
            peaks[batch] = peak_bytes(shape, method, budget, batch, new_tokens, device, dtype, site)
            return peaks[batch] is not None and peaks[batch] <= limit_bytes

        batch, _ = largest_batch(fits, max_batch)
        row = {"method": "none" if method is None else method if isinstance(method, str) else method["name"],
               "budget": 1.0 if budget is None else budget, "largest_batch": batch,
               "peak_memory_mb": round(peaks[batch] / 2**20, 1) if batch else None,
               "probes": {b: None if p is None else round(p / 2**20, 1) for b, p in sorted(peaks.items())}}
        if batch:
            row |= throughput(shape, method, budget, batch, new_tokens, repeats, device, dtype, site)
        if rows and batch and rows[0]["largest_batch"]:
            row["batch_ratio"] = round(batch / rows[0]["largest_batch"], 3)
            row["throughput_ratio"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
        rows.append(row)
    return rows
