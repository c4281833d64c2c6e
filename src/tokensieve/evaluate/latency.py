"""Measured generation latency of a (pruned) model, and the memory its KV cache takes.

Time to first token is a ``generate()`` call producing one token: image encoding, any
pruning, and the prefill. The decode latency per token is what each further token adds:
``(T(n tokens) - T(1 token)) / (n - 1)``, both medians over the samples, each sample alone
(batch 1, as a user waits for one answer). Peak memory is measured on CUDA only (the CPU
allocator keeps no per-run peak); the KV cache after prefill is counted exactly from the
tokens each LLM layer keeps.
"""

from __future__ import annotations

import statistics
import time

import torch

from tokensieve.backbones import LlavaBackbone
from tokensieve.testbed.batches import encode


def _generate_seconds(backbone: LlavaBackbone, batch: dict, new_tokens: int) -> float:
    sync = torch.cuda.synchronize if backbone.model.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    backbone.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    return time.perf_counter() - started


@torch.no_grad()
def measure_latency(backbone: LlavaBackbone, samples: list, new_tokens: int = 8, keep=None) -> dict:
    """``{"ttft_ms", "decode_ms_per_token", "peak_memory_mb"}``: medians over ``samples`` (anything
    with ``image`` and ``question``), one at a time, after one warm-up generation;
    ``peak_memory_mb`` is None off CUDA.

    keep: optional function giving each sample's kept visual-token indices (an oracle).
    """
    device = backbone.model.device
    batches = [{k: v.to(device) for k, v in encode(backbone.processor, [s]).items()} for s in samples]
    if keep is not None:
        for batch, s in zip(batches, samples):
            batch["keep"] = [keep(s)]
    _generate_seconds(backbone, batches[0], new_tokens)  # warm-up: allocator, kernels, caches
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first, whole = [], []
    for batch in batches:
        first.append(_generate_seconds(backbone, batch, 1))
        whole.append(_generate_seconds(backbone, batch, new_tokens))
    ttft = statistics.median(first)
    decode = max(0.0, (statistics.median(whole) - ttft) / (new_tokens - 1))
    return {"ttft_ms": round(1000 * ttft, 3), "decode_ms_per_token": round(1000 * decode, 3),
            "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None}


def kv_cache_bytes(config, llm_tokens: list[int], dtype_bytes: int = 2) -> int:
    """Bytes of the KV cache after one prefill in which decoder layer ``k`` keeps ``llm_tokens[k]``
    tokens: keys and values of ``num_key_value_heads x head_dim`` per token and layer.
    ``dtype_bytes``: 2 for bf16/fp16 (how LLaVA is served), 4 for fp32."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return sum(2 * tokens * kv_heads * head_dim * dtype_bytes for tokens in llm_tokens)
