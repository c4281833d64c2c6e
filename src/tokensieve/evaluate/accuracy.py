"""Accuracy of the testbed with reduction methods attached, next to the unpruned model."""

from __future__ import annotations

import statistics

from tqdm import tqdm

from tokensieve.attach import Handle, attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.data.synthetic import Sample
from tokensieve.evaluate.flops import TokenCounts, prefill_flops, token_counts
from tokensieve.evaluate.latency import kv_cache_bytes, measure_latency
from tokensieve.evaluate.sample_log import SampleLog
from tokensieve.method import Budget
from tokensieve.testbed.evaluate import heldout_samples, object_oracle, predict, scene_spec_for, summarise
from tokensieve.testbed.processor import prompt

FLOPS_STAGES = ("vision", "projector", "llm", "lm_head", "total")


def median_text_tokens(backbone: LlavaBackbone, samples: list[Sample]) -> int:
    """Median non-image tokens of the samples' prompts (the prompt length FLOPs are reported for)."""
    tok = backbone.processor.tokenizer
    lengths = [sum(t != backbone.image_token_id for t in tok(prompt(s.question))["input_ids"]) for s in samples]
    return int(statistics.median(lengths))


def cost_fields(backbone: LlavaBackbone, text_tokens: int, handle: Handle | None = None,
                counts: TokenCounts | None = None) -> dict:
    """``flops`` per stage, ``tokens_per_llm_layer`` and ``kv_cache_bytes`` (bf16) of one
    prefill, as the handle's latest forward pass reduced it (the unpruned model without a
    handle), or for the given ``counts``."""
    counts = counts or token_counts(backbone, text_tokens, handle)
    flops = prefill_flops(backbone.config, *counts)
    return {"flops": {k: flops[k] for k in FLOPS_STAGES}, "tokens_per_llm_layer": counts.llm_tokens,
            "kv_cache_bytes": kv_cache_bytes(backbone.config, counts.llm_tokens)}


def timing_fields(backbone: LlavaBackbone, samples: list[Sample], keep=None) -> dict:
    """Measured latency on ``samples`` (none: every field None, the timing was not asked for)."""
    if not samples:
        return {"ttft_ms": None, "decode_ms_per_token": None, "peak_memory_mb": None}
    return measure_latency(backbone, samples, keep=keep)


def compare_methods(backbone: LlavaBackbone, methods: list[str], keeps: list[str], mode: str = "hard",
                    site: str | None = None, n_samples: int = 500, batch_size: int = 64,
                    progress: bool = True, pruner=None, oracle: bool = False,
                    log: SampleLog | None = None, timing_samples: int = 8) -> list[dict]:
    """Rows ``{method, site, keep, visual_tokens_kept, accuracy, per_family, flops, flops_ratio,
    tokens_per_llm_layer}``; the first row is the unpruned model (``method`` ``"none"``),
    measured on the same held-out samples. FLOPs are for one prefill of the median prompt.

    pruner: optional trained :class:`tokensieve.train.parts.PrunerParts`, evaluated at each
    budget (tokens entering the LLM; its heads then keep their trained shares) as ``two_stage``.
    oracle: add the object oracle at each budget (``object_oracle``: tokens on objects only,
    one per object before a second; fewer than the budget when the objects cover fewer).
    log: per-sample results are appended there batch by batch, and samples it already holds
    are not scored again (an interrupted evaluation resumes).
    timing_samples: how many samples (one at a time) give every row's measured ``ttft_ms``,
    ``decode_ms_per_token`` and ``peak_memory_mb`` (CUDA only); 0 leaves them None.
    Every row also has ``kv_cache_bytes``, the bf16 KV cache after one prefill.
    """
    for name in methods:  # names, sites, budgets and parameters are checked before any model work
        for keep in keeps:
            attach(backbone, name, keep, site=site, mode=mode).detach()
    for keep in (keeps or [None]) if pruner is not None else []:
        pruner.attach(backbone, mode, keep=keep)[0].detach()
    samples = heldout_samples(n_samples, spec=scene_spec_for(backbone))
    text_tokens = median_text_tokens(backbone, samples)
    full = summarise(samples, _predictions(backbone, samples, "none", log, batch_size))
    timed = samples[:timing_samples]
    baseline = cost_fields(backbone, text_tokens)
    rows = [{"method": "none", "site": None, "keep": 1.0, "visual_tokens_kept": backbone.n_visual_tokens,
             **full, **baseline, "flops_ratio": 1.0, **timing_fields(backbone, timed)}]
    cases = [(m, k) for m in methods for k in keeps]
    if pruner is not None:
        cases += [(pruner, k) for k in keeps or [None]]
    for name, keep in tqdm(cases, desc="methods x budgets", unit="run", disable=not progress):
        if isinstance(name, str):
            handle = attach(backbone, name, keep, site=site, mode=mode)
        else:
            handle = name.attach(backbone, mode, keep=keep)[0]
            name = "two_stage"
        stage = handle.stages[0]
        try:
            result = summarise(samples, _predictions(backbone, samples, f"{name}@{stage.site}:{keep}", log, batch_size))
            if str(stage) not in handle.last_counts:  # every sample came from the log: one pass for the counts
                predict(backbone, samples[:1])
            cost = cost_fields(backbone, text_tokens, handle)
            timing = timing_fields(backbone, timed)
        finally:
            handle.detach()
        rows.append({"method": name, "site": stage.site, "keep": keep if keep is not None else "trained",
                     "visual_tokens_kept": handle.last_counts[str(stage)][1], **result, **cost,
                     "flops_ratio": round(cost["flops"]["total"] / baseline["flops"]["total"], 4), **timing})
    for keep in keeps if oracle else []:
        rows.append(_oracle_row(backbone, samples, keep, text_tokens, baseline, batch_size, log, timed))
    return rows


def _predictions(backbone: LlavaBackbone, samples: list[Sample], run: str, log: SampleLog | None,
                 batch_size: int, keep=None) -> list[str]:
    """Answers to every sample; with a log, those it holds are read back and the rest scored
    and appended batch by batch (an interruption loses at most one batch)."""
    if log is None:
        return predict(backbone, samples, keep, batch_size)
    todo = [s for s in samples if s.index not in log.done(run)]
    for i in range(0, len(todo), batch_size):
        chunk = todo[i: i + batch_size]
        log.append(run, chunk, predict(backbone, chunk, keep, batch_size))
    return [log.done(run)[s.index]["prediction"] for s in samples]


def _oracle_row(backbone: LlavaBackbone, samples: list[Sample], keep: str, text_tokens: int, baseline: dict,
                batch_size: int, log: SampleLog | None, timed: list[Sample]) -> dict:
    """The object oracle's row: chosen between the projector and the LLM, like a projector-site method."""
    count = Budget.parse(keep).resolve(backbone.n_patches, "the object oracle")
    choose = object_oracle(count, scene_spec_for(backbone).grid)
    result = summarise(samples, _predictions(backbone, samples, f"object_oracle:{keep}", log, batch_size, choose))
    kept = round(statistics.mean(len(choose(s)) for s in samples))
    full = token_counts(backbone, text_tokens)
    counts = TokenCounts(full.vision_tokens, full.projector_tokens, [text_tokens + kept] * len(full.llm_tokens))
    cost = cost_fields(backbone, text_tokens, counts=counts)
    return {"method": "object_oracle", "site": "projector", "keep": keep, "visual_tokens_kept": kept, **result,
            **cost, "flops_ratio": round(cost["flops"]["total"] / baseline["flops"]["total"], 4),
            **timing_fields(backbone, timed, keep=choose)}
