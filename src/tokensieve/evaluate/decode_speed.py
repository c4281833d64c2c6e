"""Decoding after a (pruned) prefill: time per generated token, the KV cache the prefill left,
end-to-end ``generate()`` and peak memory, for the pruned model, the unpruned one and a natively
shorter prompt (only the kept visual tokens, no pruning code), the three run alternately.

Time per token is read inside one ``generate()`` call: a streamer stamps each new token as it
reaches the host (``generate`` copies it there), and the decode steps are the ``N - 1`` after
the first token, so the prefill is not in it. The KV cache is counted from the tensors the
cache holds after one prefill (keys and values of every layer, ``numel x element size``).
Peak memory is ``torch.cuda.max_memory_allocated`` over one ``generate()`` (weights included);
None on a CPU, whose allocator keeps no peak.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from tokensieve.backbones import LlavaBackbone

VARIANTS = ("full", "pruned", "short")


class _Arrivals(BaseStreamer):
    """Host time at which each ``put`` (the prompt, then every new token) arrived."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds, summed over its layers."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def timed_generate(generate: Callable[..., torch.Tensor], new_tokens: int,
                   sync: Callable[[], None]) -> tuple[float, float]:
    """``(seconds of the whole call, seconds per decode step)`` of ``generate(max_new_tokens=...,
    streamer=...)`` making exactly ``new_tokens`` (>= 2) tokens greedily."""
    arrivals = _Arrivals()
    sync()
    started = time.perf_counter()
    generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=arrivals)
    sync()
    whole = time.perf_counter() - started
    tokens = arrivals.times[-new_tokens:]
    return whole, (tokens[-1] - tokens[0]) / (new_tokens - 1)


@torch.no_grad()
def decode_figures(pruned: LlavaBackbone, native: LlavaBackbone, inputs: dict[str, torch.Tensor],
                   short_kept: torch.Tensor, new_tokens: int = 8, repeats: int = 3,
                   sync: Callable[[], None] = lambda: None) -> dict:
    """Per variant (``full``: unpruned, ``pruned``, ``short``: the prompt with only ``short_kept``
    ``(B, K)`` of its visual tokens): ``decode_ms_per_token_*``, ``generate_s_*`` (medians of
    ``repeats`` alternating runs after one warm-up each), ``kv_cache_bytes_*``, ``peak_memory_mb_*``;
    and ``decode_ratio_to_short``, ``kv_ratio_to_short`` (pruned over short: the target reads <= 1.05).

    pruned: the backbone with pruning attached; native: its hook-free twin (no pruning code);
    inputs: ``input_ids``, ``attention_mask`` ``(B, L)``, ``pixel_values`` ``(B, 3, H, W)``.
    """
    kept = {"full": None, "pruned": None, "short": short_kept}
    model = {"full": native, "pruned": pruned, "short": native}

    def run(name: str) -> Callable[..., torch.Tensor]:
        return lambda **kw: model[name].generate(**inputs, kept=kept[name], **kw)

    for name in VARIANTS:  # warm-up: allocator, kernels, caches
        timed_generate(run(name), new_tokens, sync)
    whole: dict[str, list[float]] = {name: [] for name in VARIANTS}
    step: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name in VARIANTS:
            seconds, per_token = timed_generate(run(name), new_tokens, sync)
            whole[name].append(seconds)
            step[name].append(per_token)
    device = inputs["input_ids"].device
    row = {}
    for name in VARIANTS:
        out = model[name].forward(**inputs, kept=kept[name], use_cache=True, logits_to_keep=1)
        row[f"decode_ms_per_token_{name}"] = round(1000 * statistics.median(step[name]), 3)
        row[f"generate_s_{name}"] = round(statistics.median(whole[name]), 4)
        row[f"kv_cache_bytes_{name}"] = cache_bytes(out.past_key_values)
        row[f"peak_memory_mb_{name}"] = _peak_memory_mb(run(name), new_tokens, device)
    row["decode_ratio_to_short"] = round(row["decode_ms_per_token_pruned"] / row["decode_ms_per_token_short"], 3)
    row["kv_ratio_to_short"] = round(row["kv_cache_bytes_pruned"] / row["kv_cache_bytes_short"], 3)
    return row


def _peak_memory_mb(generate: Callable[..., torch.Tensor], new_tokens: int, device: torch.device) -> float | None:
    """Peak CUDA memory allocated (MiB) during one ``generate()``; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
