"""Reduction stages on a Qwen-VL model (:class:`~tokensieve.backbones.hf_qwen.QwenVLBackbone`): the session.

One :class:`QwenPruningSession` per attached handle. Its :class:`QwenStagePlan` checks the stages
when it is installed; then, in every forward pass through the adapter (``forward``, ``generate``,
``prepare``):

* ``llm.0``: after the vision tower has run, the stage chooses per image or video which of the patch
  merger's output tokens (the visual tokens as the LLM receives them) stay, and the adapter
  assembles the LLM input from those (its ``kept=`` path: shrunk placeholder runs, M-RoPE ids kept,
  every DeepStack level cut with the same indices). Rows of its :class:`SiteInputs` are images or videos: each
  has its own token count and budget (a ratio: that share of its tokens; a count: that many of every
  image).
* ``llm.k`` (``k >= 1``): before decoder layer ``k`` each row chooses among all its visual tokens
  (:mod:`.row_llm`; a ratio: that share of the row's tokens; a count: that many in every row);
  Qwen3-VL's DeepStack features are then added by the session, to the columns that remain
  (:mod:`.qwen_deepstack`).

``hard`` mode removes the dropped tokens; ``soft`` keeps every token and masks the dropped ones as
attention keys (:mod:`.qwen_soft`). Positions are never renumbered (Qwen-VL's ids are 3-D); a method may
make tokens inside the LLM in hard mode, each taking the M-RoPE ids of a token it names (SparseVLM with
``positions="original"``: its cluster centre's), but not before Qwen3-VL's last DeepStack layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.per_image_stage import PerImageStage, PerImageStagePlan, per_image_questions
from tokensieve.backbones.qwen_deepstack import QwenDeepStack
from tokensieve.backbones.qwen_soft import QwenSoftMasks
from tokensieve.backbones.qwen_tower import TOWER_SIGNALS, TowerCapture, refuse_without_cls, without_cls_hint
from tokensieve.backbones.qwen_units import merger_inputs, refuse_video
from tokensieve.backbones.row_llm import RowLLMStages
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection, VisualUnit

LLM0 = Site("llm", 0)
PROJECTOR = Site("projector")  # the patch merger: the same tokens as llm.0 (module docstring of hf_qwen)


class QwenStagePlan(PerImageStagePlan):
    """The stage plan on Qwen-VL: ``llm.0`` (or ``projector``, the same tokens) and ``llm.k``, ``hard`` or
    ``soft`` mode, tokens a method makes inside the LLM in hard mode only, and no renumbered positions. At
    attach a count at ``llm.0`` is checked against the most tokens one image can give
    (:meth:`QwenVLBackbone.most_image_tokens`)."""

    takes_video = True

    def __init__(self, backbone, handle):
        self.deepstack_levels = backbone.deepstack_levels
        super().__init__(backbone, handle)
        if PROJECTOR in self.stages and LLM0 in self.stages:
            raise TokensieveError("projector and llm.0 are the same tokens on Qwen-VL (the patch merger's output): "
                                  "give one stage there, not two")

    def missing_site(self, site: Site, st) -> TokensieveError:
        if site.stage == "llm":
            return super().missing_site(site, st)
        return TokensieveError(f"{st}: site {site} does not exist on the Qwen-VL backbone yet; its sites are projector "
                               "and llm.0 (the patch merger's output, per image) and llm.k before decoder layer k")

    def check_stage(self, site: Site, st) -> None:
        refuse_without_cls(st)
        if getattr(st.method, "renumbers_positions", False):
            raise TokensieveError(f"{st}: {st.method.name} renumbers positions, which is not defined for Qwen-VL's "
                                  "3-D M-RoPE ids; give it positions=\"original\" (ours: kept tokens keep their ids, "
                                  "tokens it makes take a token's)")
        if getattr(st.method, "own_order", None):
            raise TokensieveError(f"{st}: {st.method.name} gives the LLM its kept tokens in an order of its own "
                                  f"({st.method.own_order}), which Qwen-VL cannot (kept tokens stay in grid order, with "
                                  "their M-RoPE ids); give it order=\"positions\"")
        hint = without_cls_hint(st.method) if getattr(st.method, "no_cls_options", None) else ""
        self.refuse_made_tokens(site, st, "Qwen-VL", "; before it each visual token's M-RoPE position comes from the "
                                f"image grid{hint}")
        if st.method.makes_extra_tokens and site.layer < self.deepstack_levels:
            raise TokensieveError(f"{st}: {st.method.name} adds tokens of its own at {site}, before Qwen3-VL adds its "
                                  "DeepStack features to the visual tokens (after layers "
                                  f"0..{self.deepstack_levels - 1}), of which a made token has none; give it layers >= "
                                  f"{self.deepstack_levels}")

    def budget_where(self, site: Site, n: int) -> str:
        return f"{site} (the most one image gives with this processor's max_pixels)"


class QwenPruningSession(PerImageStage, RowLLMStages, QwenDeepStack, QwenSoftMasks):
    """The stages of one handle on one Qwen-VL adapter, and what they capture in a forward pass.

    It is also one of the handle's hooks: ``remove()`` (on ``handle.detach()``) takes it off the
    adapter, which then runs the plain model again.
    """

    def __init__(self, backbone, handle, seed: int):
        self.bb, self.handle, self.seed = backbone, handle, seed
        self.plan = QwenStagePlan(backbone, handle)
        self.site = PROJECTOR if PROJECTOR in self.plan.stages else LLM0  # the site of the stage before the LLM
        self.stage = self.plan.stages.get(self.site)  # that stage, if any
        self.llm_stages = {site: st for site, st in self.plan.stages.items() if not site.before_llm}
        self._merger_inputs: list[torch.Tensor] = []  # (S, d_v) per tower pass: the patch merger's packed input
        self._soft_kept: list[torch.Tensor] | None = None  # soft: llm.0's kept indices per image, until the LLM pass
        self.llm0_key_masks: list[torch.Tensor | None] = []  # per image the (K_i,) key weights llm.0 gave, or None
        wants = set() if self.stage is None else set(self.stage.method.signals) | set(self.stage.method.optional_signals)
        self.reads_merger_input = "projector_input" in wants
        self.tower = TowerCapture(backbone, lambda: handle.active) if set(TOWER_SIGNALS) & wants else None
        if self.tower is not None:
            self.tower.install(handle.hooks)
        if self.reads_merger_input:
            handle.hooks.append(backbone.visual.merger.register_forward_hook(self._capture_merger_input))
        self._register_llm()
        self._register_deepstack()
        handle.hooks.append(self)

    def remove(self) -> None:
        """Take this session off its adapter."""
        if self in self.bb.sessions:
            self.bb.sessions.remove(self)

    def begin_llm_pass(self, *args, **kwargs) -> None:
        """:meth:`.row_llm.RowLLMStages.begin_llm_pass`, then in soft mode ``llm.0``'s key biases
        (:meth:`_begin_soft`)."""
        super().begin_llm_pass(*args, **kwargs)
        if self.soft:
            self._begin_soft(self.bb.model.dtype)

    def _capture_merger_input(self, _merger, args, _output) -> None:
        if self.handle.active:
            self._merger_inputs.append(args[0])

    def _projector_inputs(self, tower_grids: list[torch.Tensor], kinds: list[str]
                          ) -> Callable[[], list[torch.Tensor]]:
        """A function giving, per unit, the merger's input behind each of its tokens
        (:func:`.qwen_units.merger_inputs`), from this pass's tower passes (``tower_grids``: theirs)."""
        captured, self._merger_inputs = self._merger_inputs[len(self._merger_inputs) - len(tower_grids):], []
        cache: list[list[torch.Tensor]] = []

        def get() -> list[torch.Tensor]:
            if not cache:
                cache.append(merger_inputs(self.bb, captured, tower_grids, kinds))
            return cache[0]
        return get

    def choose(self, pooled: tuple[torch.Tensor, ...], units: list[list[VisualUnit]], tower_grids: list[torch.Tensor],
               kinds: list[str], questions: Callable[[], list[str]] | None = None,
               question_states: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The stage's choice for every visual unit (image or video) of the batch, each a row of its own.

        pooled: the tower's output, one ``(N_i, d)`` per unit in unit order (prompt order over the batch).
        units: per row its units (:func:`.qwen_units.visual_units`); tower_grids: the ``(n, 3)`` grids of
        the batch's tower passes (images, then videos); kinds: per unit ``"image"`` or ``"video"``.
        questions: a function giving each unit's question as text (its row's), for methods that
        read it (CDPruner); None when the adapter has no processor to decode it with.
        question_states: a function giving unit ``i``'s question (its row's) as ``(1, T, d)`` input
        embeddings and ``(1, T)`` validity, for methods that read it (the learned pruner's heads).
        Returns per unit the kept indices ``(K_i,)`` (increasing) and the values the method gives
        the kept tokens ``(K_i, d)`` (None: the tokens as they are). Records counts (rows: images)
        and ``handle.last_kept``, and in ``llm0_key_masks`` the ``(K_i,)`` key weights a method gives
        (soft mode reads them).
        """
        inputs_of = self._projector_inputs(tower_grids, kinds)
        every = [replace(unit, start=0) for row in units for unit in row]  # each unit alone in its SiteInputs
        tower = None if self.tower is None else self.tower.signals(tower_grids, kinds)
        question_of = per_image_questions(questions)

        def inputs(i: int) -> dict:  # unit i's SiteInputs fields beyond its tokens
            signals = {"projector_input": lambda: inputs_of()[i][None]} if self.reads_merger_input else {}
            refuse_video(self.stage, every[i:i + 1], f"unit {i} (images and videos in prompt order)")
            if tower is not None:
                signals.update({name: lambda name=name: tower()[name][i][None] for name in TOWER_SIGNALS})
            states = None if question_states is None else (lambda: question_states(i))
            return {"signals": signals, "question_states": states, "question_text": question_of(i), "units": [[every[i]]]}

        chosen = self.choose_each(pooled, inputs, [unit.kind for unit in every])
        kept = [sel.indices[0] for sel in chosen]
        values = [None if sel.tokens is None else sel.tokens[0] for sel in chosen]
        self.llm0_key_masks = [None if sel.key_mask is None else sel.key_mask[0] for sel in chosen]
        self.record_images(kept, [t.shape[0] for t in pooled])
        return kept, values

    def refuse_selection(self, sel: Selection) -> None:
        """One line for what a method gives at the stage before the LLM that Qwen-VL cannot place."""
        if sel.order is not None:
            raise TokensieveError(f"{self.stage.method.name} at {self.site}: an order of its own is not supported "
                                  "on Qwen-VL (kept tokens stay in image order, with their grid positions)")
        if sel.extra is not None:
            raise TokensieveError(f"{self.stage.method.name} at {self.site}: tokens of its own are not supported "
                                  "on Qwen-VL")
