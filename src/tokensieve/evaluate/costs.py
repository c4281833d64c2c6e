"""The cost fields of an evaluation row on LLaVA: prefill FLOPs per stage, the positions entering
each LLM decoder layer, the visual tokens averaged over those layers and the KV cache, for one
prefill of the median prompt (every image gives the same visual tokens). Those of the families whose
images differ are means over the items (:mod:`.item_costs`: Qwen-VL's :mod:`.qwen_costs`, LLaVA-NeXT's
and LLaVA-OneVision's :mod:`.anyres_costs`)."""

from __future__ import annotations

import statistics

from tokensieve.attach import Handle
from tokensieve.backbones.chat_format import prompt_text
from tokensieve.data.vqa_files import VQAItem
from tokensieve.evaluate.flops import TokenCounts, prefill_flops, token_counts
from tokensieve.evaluate.latency import kv_cache_bytes

FLOPS_STAGES = ("vision", "projector", "llm", "lm_head", "total")


def median_text_tokens(backbone, items: list[VQAItem]) -> int:
    """Median non-image tokens of the items' prompts (the prompt length FLOPs are reported for)."""
    tok = backbone.processor.tokenizer
    lengths = [sum(t != backbone.image_token_id for t in tok(prompt_text(backbone, i.question))["input_ids"])
               for i in items]
    return int(statistics.median(lengths))


def cost_fields(backbone, text_tokens: int, handle: Handle | None = None, counts: TokenCounts | None = None) -> dict:
    """``flops`` per stage, ``tokens_per_llm_layer``, ``visual_tokens_mean_llm`` (visual tokens
    averaged over the LLM's layers) and ``kv_cache_bytes`` (bf16) of one prefill of a LLaVA model,
    as the handle's latest forward pass reduced it (the unpruned model without a handle), or for
    the given ``counts``."""
    counts = counts or token_counts(backbone, text_tokens, handle)
    flops = prefill_flops(backbone.config, *counts)
    mean_visual = statistics.mean(counts.llm_tokens) - text_tokens
    return {"flops": {k: flops[k] for k in FLOPS_STAGES}, "tokens_per_llm_layer": counts.llm_tokens,
            "visual_tokens_mean_llm": round(mean_visual, 2),
            "kv_cache_bytes": kv_cache_bytes(backbone.config, counts.llm_tokens)}


class LlavaCosts:
    """Cost fields of the rows of one evaluation on LLaVA: one prefill of the median prompt."""

    def __init__(self, backbone, items: list[VQAItem]):
        self.backbone = backbone
        self.text_tokens = median_text_tokens(backbone, items)
        self.visual_tokens = backbone.n_visual_tokens  # per image, unpruned

    def of_run(self, handle: Handle | None = None, item_kept: list[dict[str, int]] | None = None) -> dict:
        """:func:`cost_fields` of the unpruned model, or of ``handle`` as it acted (``item_kept`` is
        already in the handle's counts)."""
        return cost_fields(self.backbone, self.text_tokens, handle)
