"""Analytic FLOPs of one prefill of a LLaVA-NeXT or LLaVA-OneVision model on a prompt with one image,
stage by stage: the conventions and block model of :mod:`tokensieve.evaluate.flops`.

What differs from LLaVA-1.5 (docs/evaluation.md, "Prefill FLOPs"): the image is cut into ``n_crops``
crops (the base image and the high-resolution ones), and the tower (patch embedding and every block, on
each crop's ``g*g`` patches, plus CLIP's CLS) and the projector (on each crop's features) run once per
crop, whatever the LLM is later given. Packing (unpadding, OneVision's bilinear resampling of a large
canvas) and the newline tokens cost no matmul; the LLM runs on the positions that entered it (text, the
kept base and crop tokens, newlines). SigLIP's attention-pooling head is not counted: OneVision
checkpoints have none (``vision_use_head`` false).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokensieve.evaluate.flops import check_count, prefill_flops


def anyres_prefill_flops(config, n_crops: int, llm_tokens: Sequence[int], cls: bool,
                         attention_scores: bool = True) -> dict:
    """FLOPs of one prefill of an anyres model of ``config`` on a prompt with one image.

    n_crops: the image's crops, the base included (its rows of the tower's batch).
    llm_tokens: one count per LLM decoder layer, positions entering it (text + visual, newlines included).
    cls: whether the tower has a CLS token (CLIP: LLaVA-NeXT; SigLIP, OneVision: none).
    Returns what :func:`tokensieve.evaluate.flops.prefill_flops` returns (``vision``, ``projector``,
    ``llm``, ``lm_head``, ``total``, ``vision_layers``, ``llm_layers``), the tower's and projector's
    figures for all the crops.
    """
    check_count("n_crops", n_crops)
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    projected = patches + int(cls and config.vision_feature_select_strategy == "full")
    one = prefill_flops(config, [patches + int(cls)] * vc.num_hidden_layers, projected, llm_tokens, attention_scores)
    vision, projector = n_crops * one["vision"], n_crops * one["projector"]
    return {"vision": vision, "projector": projector, "llm": one["llm"], "lm_head": one["lm_head"],
            "total": vision + projector + one["llm"] + one["lm_head"],
            "vision_layers": [n_crops * f for f in one["vision_layers"]], "llm_layers": one["llm_layers"]}
