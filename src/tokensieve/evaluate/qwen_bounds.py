"""The native bound of a pruned Qwen-VL prefill: the same prefill built from the model's own modules
with no pruning code, the most any method acting at those sites could reach (the Qwen twin of
:mod:`tokensieve.evaluate.native_bounds`, whose decoder loop it shares).

The vision tower runs unpruned on every image (``llm.0`` is after it). The M-RoPE ids are the
model's own, from ``get_rope_index`` on the full prompt; at ``llm.0`` the LLM prompt holds only the
kept visual tokens (a natively shorter prompt, the kept tokens keeping their 3-D ids, text after
them its own); before ``llm.k`` the layers run on the whole prompt and the rest on the kept columns
with the ids gathered to them and transformers' causal mask for that length (Qwen3-VL: each
DeepStack level added to the visual columns that are there, each its own token's feature). No hook,
session or check runs: the model is a hook-free twin (:func:`native_bounds.hook_free_twin`).

Rows must keep as many visual tokens as each other at ``llm.0`` (rows of equal image sizes and a ratio
budget do): a natively shorter batch of unequal rows would be padded otherwise than the pruned one, and
time differently. Inside the LLM, tokens a method made (SparseVLM's recycled ones) and the slots a row
keeping fewer keeps masked are stood in for by as many tokens it dropped (``native_bounds.with_stand_ins``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.qwen_kept import row_origins
from tokensieve.backbones.qwen_positions import rope_positions, token_types
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.native_bounds import (
    columns_of,
    kept_columns,
    native_decoder,
    positions_among,
    stacked_rows,
    with_stand_ins,
)


@dataclass
class QwenPlan:
    """What a pruned Qwen-VL prefill kept, as its native bound builds it.

    visual: each row's visual tokens in the prompt.
    entering: ``(B, K)`` which of them enter the LLM (indices among the row's, its images in prompt
    order), or None: all; image_rows: ``(sum K,)`` their rows in the tower's output (every image's
    tokens concatenated, image order), or None.
    llm: ``{k: (B, K_k)}``: before decoder layer ``k``, which of the visual tokens present there stay.
    """

    visual: int
    entering: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    llm: dict[int, torch.Tensor] | None = None


def qwen_native_plan(handle, backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_grid_thw: torch.Tensor) -> tuple[QwenPlan, list[torch.Tensor]]:
    """``(plan, short_kept)`` of ``handle``'s latest pruned pass on these ``(B, L)`` prompts (its
    ``handle.last_kept``); ``short_kept``: per image ``(M_i,)`` the tokens that reach the last decoder
    layer, the ``kept=`` of a natively short prompt (:func:`tokensieve.evaluate.decode_speed.decode_figures`)."""
    layout = backbone.layout(input_ids, attention_mask)
    counts = backbone.image_token_counts(image_grid_thw)
    device = input_ids.device
    stages = sorted(handle.stages, key=lambda st: Site.parse(st.site).order)
    recorded = {st.site: handle.last_kept.get(str(st)) for st in stages}
    if any(kept is None for kept in recorded.values()):
        raise TokensieveError("the native bound reads the tokens kept in a pruned pass: run one first")
    per_image = None
    if Site.parse(stages[0].site) == Site("llm", 0):
        per_image = [row[row >= 0].to(device) for row in recorded.pop(stages[0].site)]
    visual = stacked_rows(row_origins(layout.units, counts, None, device), "in the prompt").shape[1]
    current = stacked_rows(row_origins(layout.units, counts, per_image, device), "entering the LLM")  # (B, n)
    plan = QwenPlan(visual, llm={})
    if per_image is not None:
        offsets = torch.tensor([0, *counts], device=device).cumsum(0)[:-1].tolist()
        plan.entering, plan.image_rows = current, torch.cat([o + k for o, k in zip(offsets, per_image)])
    for site, kept in recorded.items():  # inside the LLM: each row's kept tokens (and stand-ins) as indices
        staying = stacked_rows(with_stand_ins(kept.to(device), current), site)
        keep = positions_among(current, staying)
        if keep is None:
            raise TokensieveError(f"the tokens kept at {site} are not among those that reached it")
        plan.llm[Site.parse(site).layer], current = keep, staying
    return plan, _per_image(current, layout.units, counts)


def _per_image(origins: torch.Tensor, units: list[list[int]], counts: list[int]) -> list[torch.Tensor]:
    """``origins`` ``(B, K)`` (each row's kept tokens as indices among its visual tokens, its images
    in prompt order) as one ``(M_i,)`` index tensor per image, in image order; units: per row its
    images (``QwenLayout.units``)."""
    kept: dict[int, torch.Tensor] = {}
    for row, origin in zip(units, origins):
        start = 0
        for unit in row:
            inside = (origin >= start) & (origin < start + counts[unit])
            kept[unit], start = origin[inside] - start, start + counts[unit]
    return [kept[i] for i in range(len(kept))]


@torch.no_grad()
def native_qwen_prefill(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                        image_grid_thw: torch.Tensor, plan: QwenPlan, logits_to_keep: int = 1) -> torch.Tensor:
    """Logits ``(B, logits_to_keep, vocab)`` of the prefill ``plan`` describes, built natively on
    ``backbone`` (a hook-free :class:`QwenVLBackbone`): ``(B, L)`` left-padded prompts with full
    image runs, packed ``pixel_values`` and ``image_grid_thw`` ``(n_images, 3)``, as
    :meth:`QwenVLBackbone.forward` takes them."""
    if backbone.sessions:
        raise TokensieveError("the native bound runs on a model with no pruning attached (hook_free_twin)")
    model = backbone.model.model
    tower = backbone.encode_images(pixel_values, image_grid_thw)  # unpruned: llm.0 is after it
    types = token_types(input_ids, backbone.image_token_id, backbone.video_token_id)
    positions = rope_positions(model, input_ids, attention_mask, image_grid_thw, types)  # (3, B, L)
    features = torch.cat(tower.pooler_output)  # (sum N_i, d): every image's tokens
    levels = [torch.cat(level) for level in getattr(tower, "deepstack_features", None) or ()]
    ids, mask, visual, count = input_ids, attention_mask, input_ids == backbone.image_token_id, plan.visual
    if plan.entering is not None:  # llm.0: a prompt holding only the kept visual tokens
        columns = kept_columns(visual, count, plan.entering)
        ids, mask, visual = ids.gather(1, columns), mask.gather(1, columns), visual.gather(1, columns)
        positions, count = columns_of(positions, columns), plan.entering.shape[1]
        features, levels = features[plan.image_rows], [level[plan.image_rows] for level in levels]
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(visual[..., None].expand_as(embeds), features.to(embeds.dtype))
    text = (mask.long().cumsum(-1) - 1).clamp(min=0)  # the 1-D row; padding columns take id 0 everywhere
    positions = torch.cat([text[None], positions * mask])
    added = [level.reshape(ids.shape[0], count, -1) for level in levels]  # (B, count, d) per DeepStack level
    hidden = native_decoder(model.language_model, embeds, mask, positions, visual, count, plan.llm or {},
                            added=added)
    return backbone.model.lm_head(hidden[:, -logits_to_keep:])
