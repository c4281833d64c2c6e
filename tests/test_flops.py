"""Analytic prefill FLOPs against torch's FLOP counter on real forward passes of tiny LLaVAs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import LlavaConfig, LlavaForConditionalGeneration

from tokensieve import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.llava_prompt import encode
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.flops import full_prefill_flops, prefill_flops, token_counts


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA SDPA kernels but not the CPU one, which would silently drop attention
# scores from every count here; map it to torch's own SDPA formula.
COUNT_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}

# Where the counter's module tracker files each stage (the tower runs outside the top
# module's forward, inside get_image_features, so it is tracked under its own class name).
VISION, PROJECTOR = "CLIPVisionModel", "LlavaMultiModalProjector"
LLM, LM_HEAD = "LlavaForConditionalGeneration.model.language_model", "LlavaForConditionalGeneration.lm_head"


def counted_prefill_flops(backbone: LlavaBackbone, inputs: dict) -> dict:
    """One prefill (logits of the last position only) under the FLOP counter, in
    :func:`prefill_flops`'s layout."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=COUNT_CPU_SDPA) as counter:
        backbone.forward(**inputs, logits_to_keep=1)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    vision_layers = [per_module[f"{VISION}.encoder.layers.{i}"] for i in range(len(backbone.vision_layers))]
    llm_layers = [per_module[f"{LLM}.layers.{k}"] for k in range(len(backbone.llm_layers))]
    return {"vision": per_module[VISION], "projector": per_module[PROJECTOR], "llm": per_module[LLM],
            "lm_head": per_module[LM_HEAD], "total": counter.get_total_flops(),
            "vision_layers": vision_layers, "llm_layers": llm_layers}


def counted_while_attached(backbone: LlavaBackbone, inputs: dict, text_tokens: int, *attach_args, **attach_kwargs):
    """(counted FLOPs, token counts the handle reports) of one prefill with a method attached."""
    handle = attach(backbone, *attach_args, **attach_kwargs)
    try:
        return counted_prefill_flops(backbone, inputs), token_counts(backbone, text_tokens, handle)
    finally:
        handle.detach()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def backbone(request, tiny_llava_dir):
    """The tiny testbed LLaVA, with explicit attention matmuls (eager) or SDPA kernels."""
    bb = LlavaBackbone.from_pretrained(tiny_llava_dir)
    bb.model.set_attn_implementation(request.param)
    return bb


@pytest.fixture(scope="module")
def prompt(backbone, tiny_samples):
    """One prompt (a batch of one: the analytic count is per sequence) and its text token count."""
    inputs = encode(backbone.processor, tiny_samples[:1])
    text_tokens = int(inputs["attention_mask"].sum()) - backbone.n_patches
    return inputs, text_tokens


def test_unpruned_prefill_matches_the_counter_stage_by_stage(backbone, prompt):
    inputs, text_tokens = prompt
    assert full_prefill_flops(backbone, text_tokens) == counted_prefill_flops(backbone, inputs)


@pytest.mark.parametrize("stages", [
    ("random", "llm.1", 0.5),
    ("random", "projector", 10),
    ("random", "llm.0", 10),
    [("random", "vision.1", 40), ("random", "projector", 20), ("random", "llm.2", 8)],
], ids=["llm", "projector", "llm.0", "three-sites"])
def test_hard_pruned_prefill_matches_the_counter(backbone, prompt, stages):
    inputs, text_tokens = prompt
    method, site, budget = (stages, None, None) if isinstance(stages, list) else stages
    counted, counts = counted_while_attached(backbone, inputs, text_tokens, method, budget, site=site, mode="hard")
    expected = prefill_flops(backbone.config, *counts)
    assert expected == counted
    assert expected["total"] < full_prefill_flops(backbone, text_tokens)["total"]


def test_fastv_counts_differ_only_by_its_scoring_in_the_layer_before_the_site(backbone, prompt):
    """FastV's signal is computed inside layer 0's k_proj hook: the last position's query
    (d x d) and its scores over all positions (d per position). That is scoring, not the
    backbone's prefill, so the analytic count leaves it out."""
    inputs, text_tokens = prompt
    counted, counts = counted_while_attached(backbone, inputs, text_tokens, "fastv", 0.5, site="llm.1", mode="hard")
    expected = prefill_flops(backbone.config, *counts)
    d = backbone.config.text_config.hidden_size
    scoring = 2 * d * d + 2 * d * counts.llm_tokens[0]
    assert counted["llm_layers"][0] - expected["llm_layers"][0] == scoring
    assert counted["total"] - expected["total"] == scoring
    assert counted["llm_layers"][1:] == expected["llm_layers"][1:]


def test_soft_mode_costs_the_unpruned_prefill(backbone, prompt):
    inputs, text_tokens = prompt
    counted, counts = counted_while_attached(backbone, inputs, text_tokens, "random", 10, site="projector", mode="soft")
    assert counts == token_counts(backbone, text_tokens)
    assert prefill_flops(backbone.config, *counts) == counted


@pytest.fixture(scope="module")
def gqa_cls_backbone(tiny_llava_dir):
    """The tiny testbed's shape with grouped-query attention (2 query heads, 1 K/V head), CLS
    kept as a visual token and features from the second-to-last block (the last still runs)."""
    config = LlavaConfig.from_pretrained(tiny_llava_dir)
    config.text_config.num_key_value_heads = 1
    config.vision_feature_select_strategy, config.vision_feature_layer = "full", -2
    torch.manual_seed(0)
    return LlavaBackbone(LlavaForConditionalGeneration(config).eval())


def test_grouped_query_attention_and_kept_cls_match_the_counter(gqa_cls_backbone):
    bb = gqa_cls_backbone
    text = torch.tensor([t for t in range(3, 20) if t != bb.image_token_id][:10])  # after the image run
    ids = torch.cat([torch.full((bb.n_visual_tokens,), bb.image_token_id), text])[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, bb.config.vision_config.image_size, bb.config.vision_config.image_size)}
    assert full_prefill_flops(bb, len(text)) == counted_prefill_flops(bb, inputs)
    counted, counts = counted_while_attached(bb, inputs, len(text), [("random", "projector", 20), ("random", "llm.2", 7)],
                                             mode="hard")
    assert counts.projector_tokens == 21 and counts.llm_tokens == [31, 31, 17]  # CLS + 20, then 7 of those 21
    assert prefill_flops(bb.config, *counts) == counted
    counted, counts = counted_while_attached(bb, inputs, len(text), [("random", "llm.0", 20)], mode="hard")
    assert counts.projector_tokens == bb.n_visual_tokens and counts.llm_tokens == [31, 31, 31]  # CLS + 20
    assert prefill_flops(bb.config, *counts) == counted


@pytest.mark.parametrize("vision, projector, llm, message", [
    ([65, -1, 65], 64, [75, 75, 75], r"vision_tokens\[1\] = -1: a token count must be an integer >= 1"),
    ([65, 65, 65], 0, [75, 75, 75], r"projector_tokens = 0"),
    ([65, 65, 65], 64, [75, 75], r"llm_tokens has 2 entries but the model has 3 LLM decoder layers"),
    ([65, 65], 64, [75, 75, 75], r"vision_tokens has 2 entries but the model has 3 vision blocks"),
    ([65, 65, 65], 64, [75, 7.5, 75], r"llm_tokens\[1\] = 7.5"),
], ids=["negative", "zero", "short-llm", "short-vision", "not-an-integer"])
def test_bad_token_counts_are_named(tiny_llava_dir, vision, projector, llm, message):
    with pytest.raises(TokensieveError, match=message):
        prefill_flops(LlavaConfig.from_pretrained(tiny_llava_dir), vision, projector, llm)


def test_negative_text_tokens_and_unrun_handles_are_named(backbone):
    with pytest.raises(TokensieveError, match=r"text_tokens = -3"):
        full_prefill_flops(backbone, -3)
    handle = attach(backbone, "random", 10, site="projector", mode="hard")
    try:
        with pytest.raises(TokensieveError, match=r"random@projector:10 has no token counts yet"):
            token_counts(backbone, 11, handle)
    finally:
        handle.detach()


def test_tome_blocks_each_see_what_the_earlier_blocks_left(backbone, prompt):
    """ToMe merges inside the tiny tower's three blocks (64 -> 48 -> 32 -> 16 patches): each block's
    attention and MLP run on the tokens entering it. The counter also sees the matching (each A
    token's cosine to each B token on the keys' head mean, ``2 |A| |B| d_head`` per merging block),
    which is scoring, not the backbone's prefill."""
    inputs, text_tokens = prompt
    counted, counts = counted_while_attached(backbone, inputs, text_tokens, "tome", 16, site="vision.0", mode="hard")
    assert counts.vision_tokens == [65, 49, 33] and counts.projector_tokens == 16
    expected = prefill_flops(backbone.config, *counts)
    d_head = backbone.config.vision_config.hidden_size // backbone.config.vision_config.num_attention_heads
    matching = sum(2 * (t // 2 + t % 2) * (t // 2) * d_head for t in (65, 49, 33))  # CLS in A: |A| = ceil(t / 2)
    assert counted["total"] - expected["total"] == matching
