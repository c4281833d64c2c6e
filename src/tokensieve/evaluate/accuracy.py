"""Accuracy of the testbed with reduction methods attached, next to the unpruned model."""

from __future__ import annotations

import statistics

from tqdm import tqdm

from tokensieve.attach import Handle, attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.data.synthetic import Sample
from tokensieve.evaluate.flops import TokenCounts, prefill_flops, token_counts
from tokensieve.method import Budget
from tokensieve.testbed.evaluate import heldout_samples, object_oracle, predict, scene_spec_for, summarise
from tokensieve.testbed.processor import prompt

FLOPS_STAGES = ("vision", "projector", "llm", "lm_head", "total")


def median_text_tokens(backbone: LlavaBackbone, samples: list[Sample]) -> int:
    """Median non-image tokens of the samples' prompts (the prompt length FLOPs are reported for)."""
    tok = backbone.processor.tokenizer
    lengths = [sum(t != backbone.image_token_id for t in tok(prompt(s.question))["input_ids"]) for s in samples]
    return int(statistics.median(lengths))


def cost_fields(backbone: LlavaBackbone, text_tokens: int, handle: Handle | None = None) -> dict:
    """``flops`` per stage and ``tokens_per_llm_layer`` of one prefill, as the handle's latest
    forward pass reduced it (the unpruned model without a handle)."""
    counts = token_counts(backbone, text_tokens, handle)
    flops = prefill_flops(backbone.config, *counts)
    return {"flops": {k: flops[k] for k in FLOPS_STAGES}, "tokens_per_llm_layer": counts.llm_tokens}


def compare_methods(backbone: LlavaBackbone, methods: list[str], keeps: list[str], mode: str = "hard",
                    site: str | None = None, n_samples: int = 500, batch_size: int = 64,
                    progress: bool = True, pruner=None, oracle: bool = False) -> list[dict]:
    """Rows ``{method, site, keep, visual_tokens_kept, accuracy, per_family, flops, flops_ratio,
    tokens_per_llm_layer}``; the first row is the unpruned model (``method`` ``"none"``),
    measured on the same held-out samples. FLOPs are for one prefill of the median prompt.

    pruner: optional trained :class:`tokensieve.train.parts.PrunerParts`, evaluated at each
    budget (tokens entering the LLM; its heads then keep their trained shares) as ``two_stage``.
    oracle: add the object oracle at each budget (``object_oracle``: tokens on objects only,
    one per object before a second; fewer than the budget when the objects cover fewer).
    """
    for name in methods:  # names, sites, budgets and parameters are checked before any model work
        for keep in keeps:
            attach(backbone, name, keep, site=site, mode=mode).detach()
    for keep in (keeps or [None]) if pruner is not None else []:
        pruner.attach(backbone, mode, keep=keep)[0].detach()
    samples = heldout_samples(n_samples, spec=scene_spec_for(backbone))
    text_tokens = median_text_tokens(backbone, samples)
    full = summarise(samples, predict(backbone, samples, batch_size=batch_size))
    baseline = cost_fields(backbone, text_tokens)
    rows = [{"method": "none", "site": None, "keep": 1.0, "visual_tokens_kept": backbone.n_visual_tokens,
             **full, **baseline, "flops_ratio": 1.0}]
    cases = [(m, k) for m in methods for k in keeps]
    if pruner is not None:
        cases += [(pruner, k) for k in keeps or [None]]
    for name, keep in tqdm(cases, desc="methods x budgets", unit="run", disable=not progress):
        if isinstance(name, str):
            handle = attach(backbone, name, keep, site=site, mode=mode)
        else:
            handle = name.attach(backbone, mode, keep=keep)[0]
            name = "two_stage"
        try:
            result = summarise(samples, predict(backbone, samples, batch_size=batch_size))
            cost = cost_fields(backbone, text_tokens, handle)
        finally:
            handle.detach()
        stage = handle.stages[0]
        rows.append({"method": name, "site": stage.site, "keep": keep if keep is not None else "trained",
                     "visual_tokens_kept": handle.last_counts[str(stage)][1], **result, **cost,
                     "flops_ratio": round(cost["flops"]["total"] / baseline["flops"]["total"], 4)})
    for keep in keeps if oracle else []:
        rows.append(_oracle_row(backbone, samples, keep, text_tokens, baseline, batch_size))
    return rows


def _oracle_row(backbone: LlavaBackbone, samples: list[Sample], keep: str, text_tokens: int, baseline: dict,
                batch_size: int) -> dict:
    """The object oracle's row: chosen between the projector and the LLM, like a projector-site method."""
    count = Budget.parse(keep).resolve(backbone.n_patches, "the object oracle")
    choose = object_oracle(count, scene_spec_for(backbone).grid)
    result = summarise(samples, predict(backbone, samples, choose, batch_size))
    kept = round(statistics.mean(len(choose(s)) for s in samples))
    full = token_counts(backbone, text_tokens)
    counts = TokenCounts(full.vision_tokens, full.projector_tokens, [text_tokens + kept] * len(full.llm_tokens))
    flops = prefill_flops(backbone.config, *counts)
    return {"method": "object_oracle", "site": "projector", "keep": keep, "visual_tokens_kept": kept, **result,
            "flops": {k: flops[k] for k in FLOPS_STAGES}, "tokens_per_llm_layer": counts.llm_tokens,
            "flops_ratio": round(flops["total"] / baseline["flops"]["total"], 4)}
