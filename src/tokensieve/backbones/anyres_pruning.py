"""Reduction stages on a LLaVA-NeXT model (:class:`~tokensieve.backbones.hf_llava_next.LlavaNextBackbone`)
or a LLaVA-OneVision or LLaVA-NeXT-Video one (:mod:`.hf_llava_onevision`, :mod:`.hf_llava_next_video`: their
images and videos): the session.

One :class:`AnyresPruningSession` per attached handle. Its :class:`AnyresStagePlan` checks the stages
when it is installed; then, in every forward pass through the adapter (``forward``, ``generate``,
``prepare``):

* ``llm.0``: after the model has packed each image's crops (or pooled a video's frames), the stage chooses
  per image (or video) which of its base and crop (or frame) tokens stay (the adapter assembles the LLM input from those, its ``kept=`` path). Each
  image is one row of :class:`SiteInputs`, with its own token count and budget (a ratio: that share
  of its tokens; a count: that many of every image), so no row of a method's input is padding.
* ``llm.k`` (``k >= 1``): before decoder layer ``k`` each row chooses among its visual tokens, per row
  (the row-wise LLM stages of :mod:`.row_llm`, on the Llama decoder math of :mod:`.llama_decoder`:
  1-D RoPE, positions kept, the KV cache shortened).

Newline tokens (``image_newline`` after every canvas row) follow the policy ``keep``: outside the
budget, never candidates, all of them enter the LLM and stay there; unless the ``llm.0`` stage's method
says ``newlines = "drop"`` (HiRED's reference passes no newline): then none enters the LLM.
``handle.last_kept[stage]`` holds, per image (``llm.0``) or row (``llm.k``), the kept tokens as positions
in the image's packed run (newlines counted in the numbering, never listed), then ``PADDING`` (-2).

The ``llm.0`` budget of an image is split over its base and crops as the handle's ``split`` says
(:mod:`.anyres_split`: ``all``, ``even``, ``hired``).

``hard`` mode removes the tokens not chosen; ``soft`` keeps every token in the sequence: ``llm.0`` gives the
others (a dropped newline too) attention mask 0, so they are never attended to and the positions skip them,
as in hard mode's shorter prompt; ``llm.k`` masks them as keys from layer ``k`` on
(:meth:`.row_llm.RowLLMStages._mask_dropped`). Budgets and ``handle.last_kept`` are hard mode's. In hard mode
a method may renumber positions after a drop and make tokens inside the LLM (SparseVLM, PyramidDrop as
released: :mod:`.row_llm`); soft mode refuses both, and an order of a method's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from tokensieve.backbones.anyres_split import SPLIT_SIGNALS, check_split, part_budgets
from tokensieve.backbones.anyres_tower import CROP_SIGNALS, CropAttention
from tokensieve.backbones.base import Site
from tokensieve.backbones.per_image_stage import (
    PerImageStage,
    PerImageStagePlan,
    embedded_question,
    per_image_questions,
)
from tokensieve.backbones.qwen_layout import QwenLayout
from tokensieve.backbones.qwen_tower import CLS_SIGNALS
from tokensieve.backbones.qwen_units import refuse_video
from tokensieve.backbones.row_llm import RowLLMStages
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection
from tokensieve.ops import trues_first

LLM0 = Site("llm", 0)
CLS_READS = (*CLS_SIGNALS, *CROP_SIGNALS)  # signals that exist only on a tower with a CLS token


class AnyresStagePlan(PerImageStagePlan):
    """The stage plan on LLaVA-NeXT and LLaVA-OneVision: ``llm.0`` (per image) and ``llm.k`` (per row),
    ``hard`` or ``soft`` mode, tokens a method makes and renumbered positions inside the LLM in hard mode; on a
    tower without CLS (OneVision's SigLIP) no method reading CLS attention. Budgets are resolved per image or
    row in each pass; at attach a count is checked against the most candidate tokens one image can give
    (:meth:`LlavaNextBackbone.most_image_tokens`)."""

    def __init__(self, backbone, handle):
        self.family, self.tower_has_cls = backbone.family_name, backbone.tower_has_cls
        self.takes_video = backbone.takes_video
        super().__init__(backbone, handle)

    def missing_site(self, site: Site, st) -> TokensieveError:
        without_cls = self._without_cls(st)  # the deeper reason, where it holds, whatever the site
        if without_cls is not None:
            return without_cls
        if site.stage != "llm":
            return TokensieveError(f"{st}: {self.family} has no {site} site: its vision tower runs on crops, not "
                                   "prompts, and the model packs every crop's full grid, so tokens are chosen after "
                                   "packing (llm.0, per image) or inside the LLM (llm.k)")
        return super().missing_site(site, st)

    def check_stage(self, site: Site, st) -> None:
        without_cls = self._without_cls(st)
        if without_cls is not None:
            raise without_cls
        self.refuse_made_tokens(site, st, self.family)

    def _without_cls(self, st) -> TokensieveError | None:
        """The refusal of a method reading CLS attention on a tower without CLS, or None."""
        needs_cls = [name for name in CLS_READS if name in st.method.signals]
        if not needs_cls or self.tower_has_cls:
            return None
        return TokensieveError(f"{st}: {st.method.name} needs {needs_cls[0]}, which the {self.family} tower (SigLIP) "
                               "does not have (no CLS token)")

    def budget_where(self, site: Site, n: int) -> str:
        return f"{site} (the most one image gives: its base and the largest pinpoint's crops, newlines left out)"

    def varies_per_row(self, site: Site) -> bool:
        """True: at ``llm.0`` each image is chosen alone, so it may keep fewer than its budget (HiRED)."""
        return True


class AnyresPruningSession(PerImageStage, RowLLMStages):
    """The stages of one handle on one LLaVA-NeXT (or LLaVA-OneVision) adapter, and what they capture in a forward pass.

    It is also one of the handle's hooks: ``remove()`` (on ``handle.detach()``) takes it off the
    adapter, which then runs the plain model again.
    """

    tokens_note = " (newlines left out)"

    def __init__(self, backbone, handle, seed: int):
        self.bb, self.handle, self.seed = backbone, handle, seed
        self.plan = AnyresStagePlan(backbone, handle)
        self.site = LLM0
        self.stage = self.plan.stages.get(LLM0)  # the stage at llm.0, if any
        self.split = handle.split
        # soft: per image (N_i,) True on the tokens llm.0 chose (and the newlines that enter), for the LLM pass
        self.soft_alive: list[torch.Tensor] | None = None
        # hard: per image how many of its tokens llm.0 chose (newlines left out), for the LLM pass
        self.chosen_counts: list[int] | None = None
        check_split(self.split, self.plan.stages)
        self.llm_stages = {site: st for site, st in self.plan.stages.items() if site != LLM0}
        self._projector_inputs: list[torch.Tensor] = []  # per tower pass (images, then videos): (crops, g*g, d_v)
        wants = set() if self.stage is None else set(self.stage.method.signals) | set(self.stage.method.optional_signals)
        wants |= SPLIT_SIGNALS[self.split]
        if "projector_input" in wants:
            handle.hooks.append(backbone.projector.register_forward_hook(self._capture_projector_input))
        self.crops = CropAttention(backbone, wants, lambda: handle.active, handle.scoring) \
            if wants & set(CROP_SIGNALS) else None
        if self.crops is not None:
            self.crops.install(handle.hooks)
        self._register_llm()
        handle.hooks.append(self)

    def remove(self) -> None:
        """Take this session off its adapter."""
        if self in self.bb.sessions:
            self.bb.sessions.remove(self)

    def _capture_projector_input(self, _projector, args, _output) -> None:
        if self.handle.active:
            self._projector_inputs.append(args[0])

    # --- llm.0 --------------------------------------------------------------------------
    def choose(self, packed: list[torch.Tensor], layouts: list, question_mask: tuple[torch.Tensor, torch.Tensor],
               questions: Callable[[], list[str]] | None = None) -> list[torch.Tensor]:
        """The ``llm.0`` stage's choice for every image of the batch.

        packed: per image (or video) its packed run ``(N_i, d)``; layouts: their :class:`AnyresLayout`
        (a video's :class:`~tokensieve.backbones.pooled_video.PooledVideoLayout`); question_mask:
        ``(input_ids, mask)`` ``(B, L)``, True on each row's question tokens (image ``i`` is row ``i``'s);
        questions: a function giving each image's question as text (None without a processor to decode it).
        Returns per image the positions in its run that enter the LLM, increasing (a video whose method gives
        an order: its kept tokens in that order, then its newline): every newline (none
        where the method's ``newlines`` is ``"drop"``) and the kept base and crop tokens. Records counts
        (rows: images, tokens: newlines left out) and ``handle.last_kept``.
        """
        kinds = [layout.kind for layout in layouts]
        # Each unit's first row in its tower pass (images and videos each have their own pass, in this order).
        first = [sum(other.n_crops for other in layouts[:i] if other.kind == layout.kind) for i, layout in
                 enumerate(layouts)]
        passes = [kind for kind in ("image", "video") if kind in kinds]
        captured, self._projector_inputs = dict(zip(passes, self._projector_inputs[-len(passes):])), []
        question_of = per_image_questions(questions)

        def projector_input(i: int, candidates: torch.Tensor) -> torch.Tensor:  # (1, n_i, d_v)
            crops = captured[kinds[i]][first[i]: first[i] + layouts[i].n_crops]
            return layouts[i].pack(crops)[candidates.to(crops.device)][None]

        def question_states(i: int) -> tuple[torch.Tensor, torch.Tensor]:  # (1, T_i, d) embeddings, (1, T_i)
            return embedded_question(self.bb.model, question_mask[0][i][question_mask[1][i]])

        def crop_signals(i: int, candidates: torch.Tensor) -> dict:
            # the host's layout copied to the device, not the device's positions back to the host (a wait)
            source = {"anyres_source": lambda: layouts[i].source.to(candidates.device)[candidates][None]}
            if self.crops is None:
                return source
            return {**source, **{name: lambda name=name: self.crops.image(name, first[i], layouts[i].n_crops)
                                 for name in self.crops.blocks}}

        candidates = [layout.candidates.to(tokens.device) for tokens, layout in zip(packed, layouts)]
        # each image's one unit, its cells every position but the newlines
        units = [[replace(layout.unit(c.device), cells=c)] for layout, c in zip(layouts, candidates)]
        for i, unit in enumerate(units):
            refuse_video(self.stage, unit, f"row {i}")

        def inputs(i: int, chosen_from: torch.Tensor) -> dict:  # SiteInputs fields of image i's tokens chosen_from
            return {"signals": {"projector_input": lambda: projector_input(i, chosen_from),
                                **crop_signals(i, chosen_from)},
                    "question_states": lambda: question_states(i), "question_text": question_of(i),
                    "units": [units[i]]}

        if self.split == "all":
            chosen = self.choose_each([tokens[c] for tokens, c in zip(packed, candidates)],
                                      lambda i: inputs(i, candidates[i]), kinds)
            for i, sel in enumerate(chosen):
                if sel.order is not None and kinds[i] != "video":
                    raise TokensieveError(f"{self.stage.method.name} at llm.0: an order of its own is placed only in "
                                          f"a video's run on {self.bb.family_name} (an image's run has a newline after "
                                          f"every row); {kinds[i]} {i} is an image")
            # An image may keep fewer than its budget (HiRED): its selection's valid entries only.
            kept = [c[valid_indices(sel)] if sel.order is None else c[valid_indices(sel)][sel.order[0]]
                    for c, sel in zip(candidates, chosen)]
            ordered = [sel.order is not None for sel in chosen]
            if self.soft and any(ordered):
                raise TokensieveError(f"{self.stage.method.name} at llm.0: in soft mode every token stays in place, "
                                      "so an order of the method's own cannot be kept; use hard mode")
        else:
            for i, kind in enumerate(kinds):
                if kind == "video":
                    raise TokensieveError(f"split {self.split!r} divides an image's budget over its base and crops; "
                                          f"row {i} holds a video, which has none: give split 'all'")
            kept = [self._choose_by_part(i, packed[i], layouts[i], candidates[i], lambda c, i=i: inputs(i, c),
                                         first[i], i == len(packed) - 1) for i in range(len(packed))]
            ordered = [False] * len(packed)
        drop_newlines = getattr(self.stage.method, "newlines", "keep") == "drop"
        runs = []
        for k, layout, own_order in zip(kept, layouts, ordered):
            newlines = layout.newlines.to(k.device)
            if drop_newlines:
                runs.append(k)
            elif not own_order:
                runs.append(torch.cat([k, newlines]).sort().values)
            else:  # a video's one newline ends its run, after its tokens in the method's order
                runs.append(torch.cat([k, newlines]))
        self.record_images(kept, [len(layout.candidates) for layout in layouts])
        self.chosen_counts = [len(k) for k in kept]
        return runs

    def _choose_by_part(self, i: int, tokens: torch.Tensor, layout, candidates: torch.Tensor,
                        inputs: Callable[[torch.Tensor], dict], first: int, last: bool) -> torch.Tensor:
        """Image ``i``'s kept positions under a split: each part (base, crops) chosen alone, from its tokens
        among ``candidates`` ``(n_i,)`` with its budget (:func:`.anyres_split.part_budgets`); tokens: its packed
        run ``(N_i, d)``; inputs: the ``SiteInputs`` fields of some of its positions; first: its base crop's row
        in the tower's batch; last: the pass's last image."""
        parts = [among.to(candidates.device) for among in layout.parts]
        base = self.crops.image("first_block_crop_cls_attention", first, 1)[0, 0] if self.split == "hired" else None
        sizes = [len(among) for among in parts]
        budgets = part_budgets(self.split, self.image_keep(f"image {i}", len(candidates)), sizes, base)
        last_part = max(p for p, budget in enumerate(budgets) if budget)
        kept = []
        for p, budget in enumerate(budgets):
            if budget:
                chosen_from = candidates[parts[p]]
                sel = self._choose_one(f"image {i}", tokens[chosen_from][None], inputs(chosen_from),
                                       last and p == last_part, budget)
                kept.append(chosen_from[valid_indices(sel)])
        return torch.cat(kept).sort().values

    def refuse_selection(self, sel: Selection) -> None:
        """One line for what a method gives at ``llm.0`` that the adapter cannot place."""
        if sel.tokens is not None or sel.extra is not None or sel.key_mask is not None:
            raise TokensieveError(f"{self.stage.method.name} at llm.0: on {self.bb.family_name} a stage only chooses "
                                  "tokens (no new values, tokens of its own or key weights) for now")

    # --- llm.k --------------------------------------------------------------------------
    def begin_llm_pass(self, layout: QwenLayout, runs: list[torch.Tensor], layouts: list) -> None:
        """Called by the adapter once the LLM input ``(B, L)`` is assembled (left-padded), with its layout
        (:func:`.qwen_layout.shrunk_layout`; soft mode's masked tokens still in their runs). runs: per row
        ``(n_b,)`` the position in its image's packed run of each visual column that entered the LLM;
        layouts: the images' :class:`AnyresLayout` (a video's ``PooledVideoLayout``). Newline columns are
        left out of the candidates. ``SiteInputs.units`` shows each row's unit as its layout's ``unit()``:
        an image as one frame of one row of its packed run's positions (an anyres image is not one grid,
        its :class:`AnyresLayout` says where each position lies), a video as its frames of pooled grids."""
        alive, self.soft_alive = self.soft_alive, None
        chosen_counts, self.chosen_counts = self.chosen_counts, None
        device = layout.question_mask.device
        candidates = [~media.is_newline.to(run.device)[run] for run, media in zip(runs, layouts)]
        # each run's candidates (its tokens but the newlines), known on the host: llm.0's choice in hard mode,
        # else every candidate of its image
        counts = chosen_counts if chosen_counts is not None and alive is None else \
            [len(media.candidates) for media in layouts]
        among = [trues_first(c)[:count] for c, count in zip(candidates, counts)]  # each run's candidates, in order
        units = [[media.unit(device)] for media in layouts]
        super().begin_llm_pass(layout, [run[a] for run, a in zip(runs, among)], units)
        self.visual = [columns[a] for columns, a in zip(self.visual, among)]
        self.entering = [torch.arange(len(columns), device=device) for columns in self.visual]
        if alive is not None:  # soft llm.0: only the chosen tokens stay candidates, as many as it chose
            chosen = [trues_first(a.to(device)[run][at])[:count]
                      for a, run, at, count in zip(alive, runs, among, chosen_counts)]
            self.visual = [columns[k] for columns, k in zip(self.visual, chosen)]
            self.origin = [origin[k] for origin, k in zip(self.origin, chosen)]


def valid_indices(sel: Selection) -> torch.Tensor:
    """The kept indices of a selection of one image: ``(K,)``, its valid ones only where it keeps fewer than
    its budget (HiRED)."""
    return sel.indices[0] if sel.valid is None else sel.indices[0][sel.valid[0]]
