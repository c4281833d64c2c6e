"""The native bound of a pruned LLaVA-NeXT prefill: the same prefill with no pruning code, the most
any method acting at those sites could reach (the LLaVA-NeXT twin of
:mod:`tokensieve.evaluate.native_bounds` and :mod:`tokensieve.evaluate.qwen_bounds`, whose decoder
loop it shares).

The tower and the model's packing run unpruned on every crop (``llm.0`` is after them). At ``llm.0``
the LLM prompt holds only the tokens that entered it (a natively shorter prompt: the kept base and
crop tokens and the newlines, unless the stage's method dropped them), assembled as the adapter's
``kept=`` path does with no session attached; before ``llm.k`` the layers run on the whole prompt and
the rest on the kept columns (the newlines among them: they stay inside the LLM) with the positions
gathered to them (renumbered without gaps where a method renumbers) and transformers' causal mask for that
length. Tokens a method made (SparseVLM's recycled ones), and inside the LLM the slots a row keeping fewer
than another keeps masked, are stood in for by as many of the tokens it dropped: the same shapes, hence the
same time. The model is a hook-free twin (:func:`native_bounds.hook_free_twin`).

Rows must keep as many tokens as each other at ``llm.0`` (rows of one image size and a ratio budget do): a
natively shorter batch of unequal rows would be padded otherwise than the pruned one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.backbones.base import Site
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.native_bounds import (
    native_decoder,
    positions_among,
    stacked_rows,
    with_stand_ins,
)


@dataclass
class NextPlan:
    """What a pruned LLaVA-NeXT prefill kept, as its native bound builds it.

    count: the visual columns (base, crop and newline tokens) each row's LLM prompt holds.
    entering: per image ``(M_i,)`` the positions in its packed run that enter the LLM, increasing
    (newlines included where they enter), or None: all of them.
    llm: ``{k: (B, K_k)}``: before decoder layer ``k``, which of the visual columns present there stay.
    renumber: positions close the gaps after each drop (a method that renumbers them).
    """

    count: int
    entering: list[torch.Tensor] | None = None
    llm: dict[int, torch.Tensor] | None = None
    renumber: bool = False


def next_native_plan(handle, backbone, image_sizes: torch.Tensor) -> tuple[NextPlan, list[torch.Tensor]]:
    """``(plan, short_kept)`` of ``handle``'s latest pruned pass (its ``handle.last_kept``) on images of
    ``image_sizes`` ``(B, 2)``, one per row; ``short_kept``: per image ``(M_i,)`` the positions in its packed
    run that reach the last decoder layer, the ``kept=`` of a natively short prompt
    (:func:`tokensieve.evaluate.decode_speed.decode_figures`)."""
    layouts = [backbone.image_layout(size) for size in image_sizes.tolist()]
    stages = sorted(handle.stages, key=lambda st: Site.parse(st.site).order)
    recorded = {st.site: handle.last_kept.get(str(st)) for st in stages}
    if any(kept is None for kept in recorded.values()):
        raise TokensieveError("the native bound reads the tokens kept in a pruned pass: run one first")
    device = next(iter(recorded.values())).device
    newlines = [layout.is_newline.nonzero().flatten().to(device) for layout in layouts]
    entering = None
    if Site.parse(stages[0].site) == Site("llm", 0):
        kept = [row[row >= 0] for row in recorded.pop(stages[0].site)]
        if getattr(stages[0].method, "newlines", "keep") != "drop":
            kept = [torch.cat([k, n]).sort().values for k, n in zip(kept, newlines)]
        entering = kept
    current = stacked_rows(entering or [torch.arange(len(layout), device=device) for layout in layouts],
                    "entering the LLM")  # (B, n): positions in each row's packed run
    plan = NextPlan(current.shape[1], entering, {},
                    any(getattr(st.method, "renumbers_positions", False) for st in stages))
    for site, kept in recorded.items():  # inside the LLM: the kept tokens (and stand-ins) and the newlines there
        staying = [torch.cat([k, n[torch.isin(n, c)]]).sort().values
                   for k, n, c in zip(with_stand_ins(kept, current, newlines), newlines, current)]
        keep = positions_among(current, stacked_rows(staying, site))
        if keep is None:
            raise TokensieveError(f"the tokens kept at {site} are not among those that reached it")
        plan.llm[Site.parse(site).layer], current = keep, torch.stack(staying)
    return plan, list(current)


@torch.no_grad()
def native_next_prefill(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                        image_sizes: torch.Tensor, plan: NextPlan, logits_to_keep: int = 1) -> torch.Tensor:
    """Logits ``(B, logits_to_keep, vocab)`` of the prefill ``plan`` describes, built on ``backbone`` (a
    :class:`~tokensieve.backbones.hf_llava_next.LlavaNextBackbone` with no pruning attached): ``(B, L)``
    prompts with full image runs, ``pixel_values`` ``(B, crops, 3, S, S)`` and ``image_sizes`` ``(B, 2)``,
    as :meth:`LlavaNextBackbone.forward` takes them."""
    if backbone.sessions:
        raise TokensieveError("the native bound runs on a model with no pruning attached (hook_free_twin)")
    inputs = backbone.prepare(input_ids, attention_mask, pixel_values, image_sizes, kept=plan.entering)
    visual = (inputs.input_ids == backbone.image_token_id) & inputs.attention_mask.bool()
    hidden = native_decoder(backbone.model.model.language_model, inputs.inputs_embeds, inputs.attention_mask,
                            inputs.position_ids, visual, plan.count, plan.llm or {}, plan.renumber)
    return backbone.model.lm_head(hidden[:, -logits_to_keep:])
