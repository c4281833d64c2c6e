"""The native bound of a pruned LLaVA prefill: the same prefill built from the model's own
modules with no pruning code, the most any method acting at those sites could reach.

The tower blocks before a site run on all tokens and the rest on the kept ones; the projector
and the LLM run on the tokens that reach them; inside the LLM, the layers before ``llm.k`` run
on the full prompt and the rest on a natively shorter hidden state (the kept visual columns and
the text) with the positions gathered to them and the causal mask built by transformers for
that shorter sequence. No hook, session or check runs: the model is a hook-free twin of the
benchmarked one (:func:`hook_free_twin`), sharing its weights. The decoder loop
(:func:`native_decoder`) serves the Qwen-VL bound too (:mod:`tokensieve.evaluate.qwen_bounds`).

A plan is ``{site: (B, K) indices}``: before ``site``, keep these of the visual tokens present
there (patches after CLS in the tower and before the LLM, the image run's columns in the LLM).
"""

from __future__ import annotations

import copy
import itertools

import torch
from transformers import LlavaForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.base import Site
from tokensieve.backbones.stage_plan import EXTRA, merges_in_blocks
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.flops import TokenCounts

Plan = dict[Site, torch.Tensor]


def hook_free_twin(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A copy of ``model``'s modules sharing every parameter and buffer (no tensor is copied):
    the same weights and code, with no hook of any attached pruning. Make it before attaching."""
    if any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()):
        raise TokensieveError("make the hook-free twin before attaching a method to the model")
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _take(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tokens`` ``(B, n, d)`` at ``keep`` ``(B, K)`` -> ``(B, K, d)``."""
    return tokens.gather(1, keep[..., None].to(tokens.device).expand(-1, -1, tokens.shape[-1]))


def positions_among(current: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
    """``(B, K)``: where each of ``kept`` ``(B, K)`` sits in ``current`` ``(B, n)`` (both token ids, e.g.
    indices before any pruning), or None when one is not there."""
    match = current[:, None, :] == kept[:, :, None]  # (B, K, n)
    if not bool(match.any(-1).all()):
        return None
    return match.int().argmax(-1)


def spaced(n: int, k: int, batch: int) -> torch.Tensor:
    """``(batch, k)`` evenly spaced increasing indices into ``n`` tokens (``k <= n``)."""
    return torch.linspace(0, n - 1, k).round().long().expand(batch, -1)


def plan_from_kept(handle, backbone: LlavaBackbone) -> tuple[Plan, torch.Tensor] | None:
    """The plan of the tokens ``handle``'s stages kept in its latest pass (``handle.last_kept``),
    and ``(B, K)`` the visual tokens (of those entering the LLM unpruned) that reach its last
    layer; None when a stage made or merged tokens, or CLS enters the LLM (no index says them)."""
    if backbone.keeps_cls or any(merges_in_blocks(st.method) for st in handle.stages):
        return None
    current, plan = None, {}
    for stage in sorted(handle.stages, key=lambda st: Site.parse(st.site).order):
        kept = handle.last_kept.get(str(stage))
        if kept is None or bool((kept < 0).any()):
            return None
        if current is None:
            current = torch.arange(backbone.n_patches, device=kept.device).expand(kept.shape[0], -1)
        among = positions_among(current, kept)
        if among is None:
            return None
        plan[Site.parse(stage.site)] = among
        current = kept
    if current is None:
        return None
    return plan, current


def plan_from_counts(counts: TokenCounts, backbone: LlavaBackbone, text_tokens: int,
                     batch: int) -> tuple[Plan, torch.Tensor]:
    """A plan of evenly spaced tokens that gives every block the count ``counts`` says it saw
    (a method that merges or makes tokens: the shapes, hence the time, of its prefill), and the
    visual tokens that reach the LLM's last layer."""
    cls, plan, patches = int(backbone.keeps_cls), {}, backbone.n_patches
    for i, seen in enumerate(counts.vision_tokens):
        if seen - 1 < patches:
            plan[Site("vision", i)], patches = spaced(patches, seen - 1, batch), seen - 1
    if counts.projector_tokens - cls < patches:
        plan[Site("projector")] = spaced(patches, counts.projector_tokens - cls, batch)
        patches = counts.projector_tokens - cls
    if counts.llm_tokens[0] - text_tokens - cls < patches:
        plan[Site("llm", 0)] = spaced(patches, counts.llm_tokens[0] - text_tokens - cls, batch)
    visual = counts.llm_tokens[0] - text_tokens
    for k, seen in enumerate(counts.llm_tokens[1:], start=1):
        if seen - text_tokens < visual:
            plan[Site("llm", k)], visual = spaced(visual, seen - text_tokens, batch), seen - text_tokens
    return plan, spaced(backbone.n_visual_tokens, visual, batch)


def native_image_features(backbone: LlavaBackbone, pixel_values: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, M, d_text)``: the tower (blocks before a ``vision`` site on all
    tokens, CLS always kept), the projector on what reaches it, and an ``llm.0`` choice after it."""
    tower = backbone.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1 + N, d_vision)
    at = backbone.feature_hidden_index
    selected = hidden
    for i, layer in enumerate(backbone.vision_layers):
        if (keep := plan.get(Site("vision", i))) is not None:
            hidden = torch.cat([hidden[:, :1], _take(hidden[:, 1:], keep)], 1)
        hidden = layer(hidden, None)
        if i + 1 == at:
            selected = hidden
    tower.post_layernorm(hidden[:, 0])  # the pooled CLS the tower computes, unused by LLaVA
    cls = int(backbone.keeps_cls)
    features = selected if cls else selected[:, 1:]
    if (keep := plan.get(Site("projector"))) is not None:
        features = torch.cat([features[:, :cls], _take(features[:, cls:], keep)], 1)
    features = backbone.projector(features)
    if (keep := plan.get(Site("llm", 0))) is not None:
        features = torch.cat([features[:, :cls], _take(features[:, cls:], keep)], 1)
    return features


def with_stand_ins(kept: torch.Tensor, current: torch.Tensor, fixed: list[torch.Tensor] | None = None
                   ) -> list[torch.Tensor]:
    """Per row, the tokens a stage inside the LLM kept, with stand-ins: as many of the tokens it dropped for
    the tokens it made and, in a row keeping fewer than the widest, for the slots that row keeps masked, so
    every row has the pruned pass's width (the same shapes, hence the same time; made tokens have no id).

    kept: ``(B, K)`` the stage's ``handle.last_kept`` (token ids, ``EXTRA`` for a made token, negative for
    padding); current: ``(B, n)`` the ids present before it; fixed: per row ids present that are never
    candidates (LLaVA-NeXT's newlines), never stand-ins. Returns per row ``(W,)`` ids, sorted, fixed ones
    left out."""
    real = [row[row >= 0] for row in kept]
    width = max(len(r) + int((row == EXTRA).sum()) for r, row in zip(real, kept))  # kept and made: the widest
    rows = []
    for b, (r, present) in enumerate(zip(real, current)):
        dropped = present[~torch.isin(present, r)]
        if fixed is not None:
            dropped = dropped[~torch.isin(dropped, fixed[b])]
        rows.append(torch.cat([r, dropped[:width - len(r)]]).sort().values)
    return rows


def stacked_rows(per_row: list[torch.Tensor], what: str) -> torch.Tensor:
    """``(B, K)`` from one ``(K,)`` per row, refused when rows differ in ``K`` (images of any size: Qwen-VL,
    LLaVA-NeXT)."""
    if len({len(r) for r in per_row}) > 1:
        raise TokensieveError(f"the native bound needs rows that keep as many visual tokens as each other ({what}: "
                              f"{sorted({len(r) for r in per_row})}); give rows of one image size and a ratio budget")
    return torch.stack(per_row)


def kept_columns(visual: torch.Tensor, count: int, keep: torch.Tensor) -> torch.Tensor:
    """``(B, L - count + K)``: the columns of a sequence that stay when only ``keep`` ``(B, K)`` of
    each row's ``count`` visual columns (True in ``visual`` ``(B, L)``) stay, in order. Built on
    the device without waiting for it: stable sorts find the visual columns and put the staying
    columns first."""
    length = visual.shape[1]
    runs = torch.sort((~visual).to(torch.uint8), dim=1, stable=True).indices[:, :count]  # (B, count)
    drop = visual.to(torch.uint8).scatter(1, runs.gather(1, keep.to(runs.device)), 0)
    return torch.sort(drop, dim=1, stable=True).indices[:, :length - count + keep.shape[1]]


def columns_of(t: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``t`` ``(..., B or 1, L)`` at ``columns`` ``(B, L')`` -> ``(..., B, L')``."""
    lead = t.shape[:-2]
    return t.expand(*lead, columns.shape[0], -1).gather(-1, columns.expand(*lead, -1, -1))


def native_decoder(lm, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, visual: torch.Tensor,
                   count: int, drops: dict[int, torch.Tensor], renumber: bool = False,
                   added: list[torch.Tensor] | None = None) -> torch.Tensor:
    """A decoder stack ``lm`` (its ``layers``, ``rotary_emb``, ``norm``, ``config``) on ``hidden``
    ``(B, L, d)`` with padding ``mask`` ``(B, L)``, shortened before each layer ``k`` of ``drops`` to
    ``(B, K)`` of the ``count`` visual columns (True in ``visual`` ``(B, L)``) present there, each time
    with the positions gathered to the columns that stay and transformers' causal mask for that
    length -> ``(B, L', d)`` after the final norm.

    positions: ``(B, L)`` ids, or ``(1 + R, B, L)``: the 1-D ids (mask, layers) over the ``R`` rows
    the rotary embedding reads (Qwen-VL's text row over t/h/w). renumber: 1-D positions close the
    gaps (``0..L'-1`` over a row's real tokens) after a drop, as methods that renumber do.
    added: per layer ``j < len(added)``, ``(B, count, d)`` features added to the visual columns after
    it (Qwen3-VL's DeepStack), each visual token its own, following the drops."""
    causal = rope = None
    present = torch.arange(count, device=hidden.device).expand(hidden.shape[0], -1)  # (B, count): entering tokens
    for k, layer in enumerate(lm.layers):
        keep = drops.get(k)
        if keep is not None:
            columns = kept_columns(visual, count, keep)
            hidden, mask, visual = _take(hidden, columns), mask.gather(1, columns), visual.gather(1, columns)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0) if renumber else columns_of(positions, columns)
            present, count = present.gather(1, keep.to(present.device)), keep.shape[1]
        if causal is None or keep is not None:
            text, rotated = (positions[0], positions[1:]) if positions.dim() == 3 else (positions, positions)
            causal = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask,
                                        past_key_values=None, position_ids=text)
            rope = lm.rotary_emb(hidden, rotated)
        hidden = layer(hidden, attention_mask=causal, position_embeddings=rope, position_ids=text)
        if added and k < len(added):
            features = _take(added[k], present).to(hidden.dtype)  # (B, count, d)
            hidden = hidden + torch.zeros_like(hidden).masked_scatter(visual[..., None].expand_as(hidden), features)
    return lm.norm(hidden)


def native_llm(backbone: LlavaBackbone, inputs, count: int, plan: Plan, renumber: bool = False) -> torch.Tensor:
    """The decoder stack and final norm on ``inputs`` (:class:`AssembledInputs`, ``count`` visual
    tokens per row), shortened before each ``llm.k`` of ``plan`` -> ``(B, L', d)``
    (:func:`native_decoder`)."""
    visual = (inputs.input_ids == backbone.image_token_id) & inputs.attention_mask.bool()
    drops = {site.layer: keep for site, keep in plan.items() if site.stage == "llm" and site.layer > 0}
    return native_decoder(backbone.language_model, inputs.inputs_embeds, inputs.attention_mask,
                          inputs.position_ids, visual, count, drops, renumber)


@torch.no_grad()
def native_prefill(backbone: LlavaBackbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   pixel_values: torch.Tensor, plan: Plan, renumber: bool = False,
                   logits_to_keep: int = 1) -> torch.Tensor:
    """Logits ``(B, logits_to_keep, vocab)`` of the prefill that ``plan`` describes, built natively
    on ``backbone`` (a hook-free one: :func:`hook_free_twin`); ``(B, L)`` prompts with full
    ``<image>`` runs, ``(B, 3, H, W)`` images, as :meth:`LlavaBackbone.forward` takes them."""
    if backbone._active_sessions():
        raise TokensieveError("the native bound runs on a model with no pruning attached (hook_free_twin)")
    features = native_image_features(backbone, pixel_values, plan)  # (B, M, d)
    inputs = backbone.assemble(input_ids, attention_mask, features)
    hidden = native_llm(backbone, inputs, features.shape[1], plan, renumber)
    return backbone.model.lm_head(hidden[:, -logits_to_keep:])


def native_plan(handle, backbone: LlavaBackbone, counts: TokenCounts, text_tokens: int,
                batch: int) -> tuple[Plan, torch.Tensor, bool]:
    """``(plan, short_kept, renumber)`` of ``handle``'s latest pruned pass: its kept tokens where
    they say it (:func:`plan_from_kept`), else the counts its blocks saw (:func:`plan_from_counts`);
    ``short_kept`` ``(B, K)``: the visual tokens a natively short prompt keeps."""
    found = plan_from_kept(handle, backbone) or plan_from_counts(counts, backbone, text_tokens, batch)
    renumber = any(getattr(st.method, "renumbers_positions", False) for st in handle.stages)
    return found[0], found[1], renumber
