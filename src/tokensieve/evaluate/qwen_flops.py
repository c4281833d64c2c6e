"""Analytic FLOPs of one prefill of a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on a prompt
with one image, stage by stage: the same conventions and the same block model as
:mod:`tokensieve.evaluate.flops` (2 x multiply-accumulates of the matmuls; attention scores over the
full square of every sequence attention runs on; norms, activations, softmax, RoPE and biases not
counted).

What differs from LLaVA (docs/evaluation.md, "Prefill FLOPs"):

* the image's patch grid ``t x h x w`` (dynamic resolution) sets the tower's tokens; the patch
  embedding is a ``3 x t_p x p x p`` 3-D convolution per patch;
* the tower attends within the image (per frame), Qwen2.5-VL's within windows in every block
  but its ``fullatt_block_indexes`` (the windows of ``transformers.vision_utils.get_vision_window_index``);
* the tower MLP: Qwen2-VL fc1/fc2 (``embed_dim * mlp_ratio``), Qwen2.5-VL gate/up/down, Qwen3-VL
  linear_fc1/fc2 (``intermediate_size``);
* the projector is the 2x2 patch merger (two linears on the 4 patches side by side), and on
  Qwen3-VL every DeepStack merger too (one per ``deepstack_visual_indexes`` entry); the DeepStack
  additions into the LLM are adds, not counted; Qwen3-VL's position-embedding interpolation is
  a lookup, not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.vision_utils import get_vision_window_index

from tokensieve.backbones.base import Site
from tokensieve.evaluate.flops import (
    block_flops,
    check_count,
    check_counts,
    decoder_layer_flops,
    patch_embedding_flops,
)


def tower_mlp(config) -> tuple[int, int, int]:
    """``(width, mlp_hidden, mlp_matrices)`` of a vision block of ``config`` (a Qwen-VL model config)."""
    vc = config.vision_config
    if config.model_type == "qwen2_vl":
        return vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), 2
    return vc.hidden_size, vc.intermediate_size, 3 if config.model_type == "qwen2_5_vl" else 2


def attention_runs(config, grid: Sequence[int], block: int) -> list[int]:
    """Token counts of the sequences vision block ``block`` attends within, for one image of
    patch grid ``grid`` ``(t, h, w)``: each frame, or (Qwen2.5-VL, a windowed block) each window."""
    vc = config.vision_config
    t, h, w = grid
    if config.model_type == "qwen2_5_vl" and block not in vc.fullatt_block_indexes:
        _, cu = get_vision_window_index(torch.tensor([list(grid)]), vc.spatial_merge_size, vc.window_size,
                                        vc.patch_size)
        return [n for n in cu.diff().tolist() if n > 0]  # window bounds, in patches
    return [h * w] * t


def qwen_prefill_flops(config, grid: Sequence[int], llm_tokens: Sequence[int], attention_scores: bool = True) -> dict:
    """FLOPs of one prefill of a Qwen-VL model on a prompt with one image.

    grid: the image's patch grid ``(t, h, w)`` (``image_grid_thw``): every vision block runs on its
        ``t*h*w`` patches (no vision sites on Qwen-VL), the merger(s) on ``t*h*w / merge**2`` tokens.
    llm_tokens: one count per LLM decoder layer, positions entering it (text + visual).
    Returns what :func:`tokensieve.evaluate.flops.prefill_flops` returns: ``vision``, ``projector``,
    ``llm``, ``lm_head``, ``total`` and the lists ``vision_layers``, ``llm_layers`` (ints).
    """
    vc, tc = config.vision_config, config.text_config
    check_counts("llm_tokens", llm_tokens, tc.num_hidden_layers, "LLM decoder layers")
    for name, n in zip("thw", grid):
        check_count(f"grid {name}", int(n))
    patches = int(grid[0] * grid[1] * grid[2])
    width, mlp_hidden, matrices = tower_mlp(config)
    patch_embedding = patch_embedding_flops(patches, vc.patch_size, width, vc.in_channels * vc.temporal_patch_size)
    vision_layers = [block_flops(patches, width, mlp_hidden, attention_scores, mlp_matrices=matrices,
                                 attention_runs=attention_runs(config, grid, i)) for i in range(vc.depth)]
    merge = vc.spatial_merge_size ** 2
    unit = width * merge  # a merged token: its 2x2 patches side by side
    out = vc.hidden_size if config.model_type == "qwen2_vl" else vc.out_hidden_size  # the LLM's width
    mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or ())
    projector = mergers * 2 * (patches // merge) * (unit * unit + unit * out)
    llm_layers = [decoder_layer_flops(tc, n, attention_scores) for n in llm_tokens]
    lm_head = 2 * tc.hidden_size * tc.vocab_size
    vision, llm = patch_embedding + sum(vision_layers), sum(llm_layers)
    return {"vision": vision, "projector": projector, "llm": llm, "lm_head": lm_head,
            "total": vision + projector + llm + lm_head, "vision_layers": vision_layers, "llm_layers": llm_layers}


def qwen_llm_tokens(layers: int, text_tokens: int, visual_tokens: int, handle=None) -> list[int]:
    """Positions entering each of ``layers`` decoder layers of a prompt of ``text_tokens`` text and
    ``visual_tokens`` visual tokens: all of them unpruned, else after ``handle``'s stages as they
    acted since it was attached (``handle.mean_kept``: at ``llm.0`` per image, inside the LLM per
    row; a one-image prompt reads both alike)."""
    kept = {} if handle is None else {Site.parse(st.site): round(handle.mean_kept(str(st))) for st in handle.stages}
    counts, visual = [], kept.get(Site("llm", 0), visual_tokens)
    for k in range(layers):
        visual = kept.get(Site("llm", k), visual) if k > 0 else visual
        counts.append(text_tokens + visual)
    return counts
