"""Measured generation latency of a (pruned) model, and the memory its KV cache takes.

Time to first token is a ``generate()`` call producing one token: image encoding, any
pruning, and the prefill. The decode latency per token is what each further token adds:
``(T(n tokens) - T(1 token)) / (n - 1)`` of the same sample. Each sample is timed alone (batch
1, as a user waits for one answer); both figures are medians over the samples, given with
their quartiles, since on a shared machine single runs can take many times longer (a spread
beyond :data:`NOISY_SPREAD` is reported). Peak memory is measured on CUDA only (the CPU
allocator keeps no per-run peak); the KV cache after prefill is counted exactly from the
tokens each LLM layer keeps.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from tokensieve.backbones.chat_format import encode_samples
from tokensieve.evaluate.intervals import quartiles

TIMED_FIELDS = {"ttft_ms": "TTFT", "decode_ms_per_token": "decode"}
# Interquartile range over median above which a timing is called noisy: a quarter of the
# samples then took at least a quarter longer (or shorter) than the typical one.
NOISY_SPREAD = 0.25


def _generate_seconds(backbone, batch: dict, new_tokens: int) -> float:
    sync = torch.cuda.synchronize if backbone.model.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    backbone.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    return time.perf_counter() - started


@torch.no_grad()
def measure_latency(backbone, samples: list, new_tokens: int = 8, kept=None,
                    progress: bool = False) -> dict:
    """``{"ttft_ms", "ttft_ms_iqr", "decode_ms_per_token", "decode_ms_per_token_iqr",
    "peak_memory_mb"}``: medians and ``[q1, q3]`` over ``samples`` (anything with ``image`` and
    ``question``), one at a time, after one warm-up generation; ``peak_memory_mb`` is None off CUDA.

    kept: optional function giving each sample's kept visual-token indices (an oracle).
    progress: a progress bar over the samples.
    """
    device = backbone.model.device
    batches = [{k: v.to(device) for k, v in encode_samples(backbone, [s]).items()} for s in samples]
    if kept is not None:
        for batch, s in zip(batches, samples):
            batch["kept"] = [kept(s)]
    _generate_seconds(backbone, batches[0], new_tokens)  # warm-up: allocator, kernels, caches
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first, per_token = [], []
    for batch in tqdm(batches, desc="timing", unit="sample", leave=False, disable=not progress):
        first.append(_generate_seconds(backbone, batch, 1))
        whole = _generate_seconds(backbone, batch, new_tokens)
        per_token.append(max(0.0, (whole - first[-1]) / (new_tokens - 1)))
    fields = {}
    for name, seconds in zip(TIMED_FIELDS, (first, per_token)):
        q1, median, q3 = quartiles([1000 * s for s in seconds])
        fields |= {name: round(median, 3), f"{name}_iqr": [round(q1, 3), round(q3, 3)]}
    return {**fields,
            "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None}


def kv_cache_bytes(config, llm_tokens: list[int], dtype_bytes: int = 2) -> int:
    """Bytes of the KV cache after one prefill in which decoder layer ``k`` keeps ``llm_tokens[k]``
    tokens: keys and values of ``num_key_value_heads x head_dim`` per token and layer.
    ``dtype_bytes``: 2 for bf16/fp16 (how LLaVA is served), 4 for fp32."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return sum(2 * tokens * kv_heads * head_dim * dtype_bytes for tokens in llm_tokens)


def timing_spread(row: dict, field: str) -> float | None:
    """``(q3 - q1) / median`` of ``row[field]`` (a name of :data:`TIMED_FIELDS`); None when not
    timed or a zero median."""
    median, iqr = row.get(field), row.get(f"{field}_iqr")
    if not median or iqr is None:
        return None
    return (iqr[1] - iqr[0]) / median


def noisy_timing_warning(rows: list[dict], labels: list[str], threshold: float = NOISY_SPREAD) -> str | None:
    """One line saying which timings of ``rows`` (named by ``labels``) spread by more than
    ``threshold`` (IQR / median), or None when none does."""
    spreads = [(spread, f"{TIMED_FIELDS[field]} of {label}")
               for row, label in zip(rows, labels, strict=True) for field in TIMED_FIELDS
               if (spread := timing_spread(row, field)) is not None]
    noisy = [(spread, where) for spread, where in spreads if spread > threshold]
    if not noisy:
        return None
    worst, where = max(noisy)
    return (f"timings are noisy: {len(noisy)} of {len(spreads)} timings spread by more than {threshold:.0%} of "
            f"their median (IQR / median), up to {worst:.0%} ({where}); the machine was busy or too few samples were "
            "timed: rerun on an idle machine or with more --timing-samples before quoting them")
