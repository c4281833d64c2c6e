"""Reduction stages running inside a LLaVA model through forward hooks: the session.

One :class:`LlavaPruningSession` per attached handle. Its :class:`LlavaStagePlan` checks the
stages and chains their budgets when it is installed; then it registers hooks on

* vision encoder blocks (``vision.i``): tokens after CLS are chosen before block ``i``;
* the projector (``projector``): fewer tokens enter the LLM;
* the projector's output (``llm.0``, a forward hook): fewer of the LLM's input embeddings;
* LLM decoder layers (``llm.k``): image tokens are chosen before layer ``k``;

and keeps what one forward pass needs (where the image run sits, which tokens are still
there). The work is split by where it happens: signal capture (:mod:`.llava_signals`), stages
before the LLM (:mod:`.llava_tower`), stages inside it (:mod:`.llava_llm`, on the Llama decoder
math of :mod:`.llama_decoder`); this module holds the plan, the per-pass state and the choice
a stage's method makes (:meth:`LlavaPruningSession._choose`).
"""

from __future__ import annotations

import re

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.block_merging import TokenSizes
from tokensieve.backbones.llama_decoder import Drop, soft_key_bias
from tokensieve.backbones.llava_llm import LLMReductions
from tokensieve.backbones.llava_signals import LlavaSignals
from tokensieve.backbones.llava_tower import TowerReductions
from tokensieve.backbones.stage_plan import StagePlan, merges_in_blocks, row_generator
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection, SiteInputs

# The end of a LLaVA prompt, where the answer starts ("... ASSISTANT:"), spaced by word-level tokenizers.
ANSWER_CUE = re.compile(r"\s*ASSISTANT\s*:\s*$", re.IGNORECASE)


class LlavaStagePlan(StagePlan):
    """The stage plan in LLaVA: sites in the tower up to its feature layer, the projector and the
    LLM's layers; CLS enters the LLM when ``vision_feature_select_strategy`` keeps it."""

    def __init__(self, backbone, handle):
        self.depth, self.last_block = len(backbone.llm_layers), len(backbone.vision_layers) - 1
        super().__init__(handle.stages, handle.mode, backbone.sites(), backbone.signals_at,
                         backbone.n_patches, backbone.keeps_cls, backbone.feature_hidden_index, handle.check)

    def signal_block(self, site: Site, signal: str) -> int:
        if signal.startswith("last_block_"):
            return self.last_block
        return super().signal_block(site, signal)

    def missing_site(self, site: Site, st) -> TokensieveError:
        if site.stage == "llm" and site.layer >= self.depth:
            return TokensieveError(f"{st}: the LLM has {self.depth} decoder layers (sites llm.0 .. "
                                   f"llm.{self.depth - 1}); llm.{site.layer} is past its depth")
        return super().missing_site(site, st)

    def check_stage(self, site: Site, st) -> None:
        """Refuse what soft mode cannot hold, and tokens a method makes where no run takes them."""
        if merges_in_blocks(st.method) and self.mode == "soft":
            raise TokensieveError(f"{st}: {st.method.name} merges tokens inside the tower's blocks, which soft "
                                  "mode cannot do (it keeps every token in place); use mode hard")
        if getattr(st.method, "renumbers_positions", False) and self.mode == "soft":
            raise TokensieveError(f"{st}: {st.method.name} renumbers positions after a drop, which soft mode "
                                  "cannot do (it keeps every token in place); use mode hard")
        if st.method.makes_extra_tokens and site.stage != "vision" and self.mode == "soft":
            raise TokensieveError(f"{st}: {st.method.name} adds tokens of its own, which soft mode cannot "
                                  "hold (it keeps every token in place); use mode hard")


class LlavaPruningSession(LlavaSignals, TowerReductions, LLMReductions):
    """The hooks of one handle on one :class:`LlavaBackbone`, and the state of one forward pass."""

    def __init__(self, backbone, handle, seed: int):
        self.bb, self.handle, self.seed, self.mode = backbone, handle, seed, handle.mode
        self.plan = LlavaStagePlan(backbone, handle)
        self.stages = self.plan.stages
        self.sizes = TokenSizes()  # tokens each tower token stands for, once a stage has merged (CLS included)
        self.prompt: tuple | None = None  # (input_ids, layout, exclude) of the latest prompt
        self.begin_image_pass()
        self.begin_llm_pass(None, 0, 0)
        self._register()

    # --- per-pass state -----------------------------------------------------------------
    def begin_prompt(self, input_ids: torch.Tensor, layout, exclude: torch.Tensor | None = None) -> None:
        """Remember the prompt, for methods that read its question (:meth:`question_span`).

        input_ids: ``(B, L)`` left-padded prompts; layout: their :class:`~.hf_llava.TokenLayout`. exclude:
        optional ``(B, L)`` positions that are not question (the answers of a teacher-forced training
        sequence, which a method must never see).
        """
        self.prompt = (input_ids, layout, exclude)
        self._question: tuple[torch.Tensor, torch.Tensor] | None = None

    def question_span(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, T), valid (B, T))``: the question of each row of the latest prompt. Questions
        follow the image run, so they are the last ``T`` columns of every row, before and after any
        visual tokens are removed. Found when first asked: where its first column is, the layout knows on
        the host (a row's padding, the real columns before its run and the run); with answers left out,
        it is read from the device, which a pass whose methods never read the question does not wait for."""
        if self._question is None:
            input_ids, layout, exclude = self.prompt
            question = layout.question_mask
            if exclude is None:
                first = min(image.padding + image.before + image.count for image in layout.images)
            else:
                question = question & ~exclude.bool()
                starts = torch.where(question.any(1), question.int().argmax(1), input_ids.shape[1])
                first = int(starts.min())
            self._question = (input_ids[:, first:], question[:, first:])
        return self._question

    def _question_before_llm(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids, valid = self.question_span()
        return self.bb.model.get_input_embeddings()(ids), valid

    def _question_in_llm(self, hidden: torch.Tensor):
        def get() -> tuple[torch.Tensor, torch.Tensor]:
            ids, valid = self.question_span()
            return hidden[:, hidden.shape[1] - ids.shape[1]:], valid
        return get

    def begin_image_pass(self) -> None:
        """Reset before a vision-tower pass."""
        self.vision_bias: torch.Tensor | None = None  # (B, 1, 1, 1 + N) soft key bias in the tower
        self.patch_alive: torch.Tensor | None = None  # (B, n) patch indices not yet soft-dropped
        self.tower_origin: torch.Tensor | None = None  # hard: (B, n) patch index of each remaining tower token
        self.patch_key_mask: torch.Tensor | None = None  # soft: (B, n) key weights of patch_alive, from the projector

    def begin_llm_pass(self, image_start: torch.Tensor | None, image_count: int, length: int) -> None:
        """Called by the adapter once the LLM input is assembled."""
        self.image_start, self.image_count, self.length = image_start, image_count, length
        self.image_alive: torch.Tensor | None = None  # (B, n) soft: image tokens not yet dropped
        self.image_valid: torch.Tensor | None = None  # (B, n) False: a token that only pads its row
        if self.mode == "soft" and self.patch_alive is not None and image_start is not None:
            alive = self.patch_alive + int(self.bb.keeps_cls)
            if self.bb.keeps_cls:
                alive = torch.cat([alive.new_zeros(alive.shape[0], 1), alive], 1)
            self.image_alive = alive
        self.run_origin = None if image_start is None else self._run_origin(image_start.shape[0], image_count)
        self.drops: list[Drop] = []  # hard: removals inside the LLM, in layer order
        self.biases: list[tuple[int, torch.Tensor]] = []  # soft: (layer, (B, L) additive key bias)
        if self.image_alive is not None and self.patch_key_mask is not None:
            # A projector-site key mask weights its tokens as keys in every LLM layer.
            patches = self.image_alive[:, int(self.bb.keeps_cls):]
            columns = image_start.to(patches.device)[:, None] + patches
            dtype = self.bb.model.dtype
            bias = torch.zeros(patches.shape[0], length, dtype=dtype, device=patches.device)
            self.biases.append((0, bias.scatter(1, columns, soft_key_bias(self.patch_key_mask, dtype))))
        self._adjusted: dict = {}  # (drops, biases, decoding) -> (original kwargs, adjusted kwargs)

    def _run_origin(self, b: int, image_count: int) -> torch.Tensor:
        """``(B, image_count)``: the patch index behind each position of the LLM's image run (-1: CLS)."""
        cls = int(self.bb.keeps_cls)
        if self.mode == "hard" and self.tower_origin is not None:
            origin = self.tower_origin
            return torch.cat([origin.new_full((b, 1), -1), origin], 1) if cls else origin
        return (torch.arange(image_count, device=self.bb.model.device) - cls).expand(b, -1)

    def _record_kept(self, site, patches: torch.Tensor) -> None:
        """``handle.last_kept[stage]``: ``(B, keep)`` patch indices (-1: CLS, -3: a token the method
        made) of the tokens ``site`` kept."""
        self.handle.last_kept[str(self.stages[site])] = patches

    def image_mask_for_llm(self) -> torch.Tensor | None:
        """Soft: ``(B, N_patches)`` True for patches still alive when the LLM starts."""
        if self.patch_alive is None:
            return None
        b = self.patch_alive.shape[0]
        n = self.bb.n_patches
        mask = torch.zeros(b, n, dtype=torch.bool, device=self.patch_alive.device)
        return mask.scatter_(1, self.patch_alive, True)

    # --- hooks --------------------------------------------------------------------------
    def _register(self) -> None:
        """Every hook: signal captures, then the stages before the LLM, then those inside it (hooks on
        one module run in the order they were registered)."""
        self._register_captures()
        self._register_tower()
        self._register_llm()

    # --- choosing ----------------------------------------------------------------------
    def _choose(self, site, tokens: torch.Tensor, signals: dict, question=None,
                valid: torch.Tensor | None = None, question_signals: dict | None = None) -> Selection:
        """Run the stage at ``site`` on ``tokens`` ``(B, n, d)``; record counts.

        question: a function giving the question states at this site, when the prompt is known.
        valid: ``(B, n)`` False for tokens that only pad their row. The returned selection's
        ``valid`` is also False where it kept such a token, and None when every slot is real.
        question_signals: name -> function giving a signal over the question tokens.
        """
        st = self.stages[site]
        b, n, _ = tokens.shape
        keep = self.plan.keep_at(site, n)
        known = self.prompt is not None
        with self.handle.scoring():
            inputs = SiteInputs(tokens, keep, str(site), lambda: row_generator(self.seed, tokens, valid), signals,
                                question if known else None, valid, question_signals if known else {},
                                self._question_text if known and self.bb.processor is not None else None)
            sel = st.method.select(inputs)
            rebuilt = self.mode == "hard" and site.before_llm and site.stage != "vision"  # the run the LLM gets
            if sel.order is not None and not rebuilt:
                raise TokensieveError(f"{st.method.name} at {site}: an order of its own goes into the image run "
                                      "before the LLM (projector, llm.0), in hard mode only")
            placed = getattr(st.method, "renumbers_positions", False) or sel.extra_at is not None
            inserted = self.mode == "hard" and not site.before_llm and placed
            if sel.extra is not None and not (rebuilt or inserted):
                raise TokensieveError(f"{st.method.name} at {site}: tokens of its own go into the image run before "
                                      "the LLM (projector, llm.0), or inside it with positions renumbered or each "
                                      "taking a token's (Selection.extra_at), in hard mode only")
            sel = self.plan.settle(site, sel, b, n, keep, valid)
        self.plan.record(self.handle, site, sel, n, valid)
        return sel

    def _question_text(self) -> list[str]:
        """Each row's question, decoded from its token ids, without the cue that opens the answer
        (LLaVA's "ASSISTANT:"), which is the prompt's, not the user's."""
        tokenizer = self.bb.processor.tokenizer
        texts = [tokenizer.decode(ids[valid], skip_special_tokens=True)
                 for ids, valid in zip(*self.question_span())]
        return [ANSWER_CUE.sub("", text).strip() for text in texts]

