"""Reduction stages running inside a LLaVA model through forward pre-hooks.

One :class:`LlavaPruningSession` per attached handle. Its :class:`LlavaStagePlan` checks the
stages and chains their budgets when it is installed; then it registers pre-hooks on

* vision encoder blocks (``vision.i``): tokens after CLS are chosen before block ``i``;
* the projector (``projector``): fewer tokens enter the LLM;
* the projector's output (``llm.0``, a forward hook): fewer of the LLM's input embeddings;
* LLM decoder layers (``llm.k``): image tokens are chosen before layer ``k``;

and keeps what one forward pass needs (where the image run sits, which tokens are still
there). ``hard`` removes tokens: hidden states, RoPE ``cos``/``sin``, ``position_ids`` and the
4D mask are gathered for every later layer, so kept tokens keep their original positions,
and during cached decoding the mask's key axis is remapped to the shorter K/V of those layers.
``soft`` keeps every token and adds ``log(mask)`` to the dropped tokens' attention-key columns
(in the tower, in the LLM from the stage's layer on; tokens dropped before the LLM get a zero
attention mask, so positions skip them exactly as after hard removal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tokensieve.backbones.attention_signals import layer_cls_attention
from tokensieve.backbones.base import Site
from tokensieve.backbones.block_merging import BlockMerger, TokenSizes
from tokensieve.backbones.llama_attention import (
    as_additive,
    last_queries_attention,
    last_query_attention,
    log_mask,
    most_negative,
    rotated_keys,
    soft_key_bias,
)
from tokensieve.backbones.stage_plan import (
    EXTRA,
    PADDING,
    StagePlan,
    merges_in_blocks,
    row_generator,
)
from tokensieve.errors import TokensieveError
from tokensieve.method import ROW_SIGNALS, Selection, SiteInputs
from tokensieve.ops import gather_tokens

# The end of a LLaVA prompt, where the answer starts ("... ASSISTANT:"), spaced by word-level tokenizers.
ANSWER_CUE = re.compile(r"\s*ASSISTANT\s*:\s*$", re.IGNORECASE)

@dataclass
class _Drop:
    """A hard removal inside the LLM, before decoder layer ``layer``.

    columns: ``(B, L')`` the original column of each column still in the sequence.
    positions: ``(B, L')`` the original column whose position (and RoPE table) each takes: its own,
        or, after a stage that renumbers positions, the one holding its new, gap-free position.
    shift: ``(B,)`` how far positions after the prompt move down (tokens generated later).
    key_bias: ``(B, L')`` additive bias on the keys of the columns (``-inf`` on slots that only pad
        a row keeping fewer tokens), or None.
    """

    layer: int
    columns: torch.Tensor
    positions: torch.Tensor
    shift: torch.Tensor
    key_bias: torch.Tensor | None = None
    inserted: bool = False  # this or an earlier stage put tokens of its own into the sequence


def llava_signals_at(backbone, site: Site) -> set[str]:
    """The signals a LLaVA adapter offers at ``site`` (docs/methods.md has the table)."""
    if site.stage == "vision":
        return {"cls_attention", "keys"} if site.layer >= 1 else set()
    if site.before_llm:
        tower = {"cls_attention", "keys", "last_block_cls_attention", "last_block_keys"}
        if site.stage == "projector":
            return tower | ({"cls_token"} if not backbone.keeps_cls else set())
        return tower | {"projector_input"}
    return {"text_attention", "prev_layer_keys", "normed_states", "positions", "layer_text_attention",
            "post_image_attention", "input_image_embeddings"}


class LlavaStagePlan(StagePlan):
    """The stage plan in LLaVA: sites in the tower up to its feature layer, the projector and the
    LLM's layers; CLS enters the LLM when ``vision_feature_select_strategy`` keeps it."""

    def __init__(self, backbone, handle):
        self.depth = len(backbone.llm_layers)
        super().__init__(handle.stages, handle.mode, backbone.sites(), lambda site: llava_signals_at(backbone, site),
                         backbone.n_patches, backbone.keeps_cls, backbone.feature_hidden_index)

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
        # Tokens a method makes go into the image run the LLM receives (a vision site, where a
        # method may do without them, is checked when it returns some).
        if st.method.makes_extra_tokens and not site.before_llm and not getattr(
                st.method, "renumbers_positions", False):
            raise TokensieveError(f"{st}: {st.method.name} adds tokens of its own, which inside the LLM need "
                                  "positions renumbered after the drop; before it, the projector and llm.0 "
                                  "sites take them")
        if getattr(st.method, "renumbers_positions", False) and self.mode == "soft":
            raise TokensieveError(f"{st}: {st.method.name} renumbers positions after a drop, which soft mode "
                                  "cannot do (it keeps every token in place); use mode hard")
        if st.method.makes_extra_tokens and site.stage != "vision" and self.mode == "soft":
            raise TokensieveError(f"{st}: {st.method.name} adds tokens of its own, which soft mode cannot "
                                  "hold (it keeps every token in place); use mode hard")


class LlavaPruningSession:
    """The hooks of one handle on one :class:`LlavaBackbone`, and the state of one forward pass."""

    def __init__(self, backbone, handle, seed: int):
        self.bb, self.handle, self.seed, self.mode = backbone, handle, seed, handle.mode
        self.plan = LlavaStagePlan(backbone, handle)
        self.stages = self.plan.stages
        self.sizes = TokenSizes()  # tokens each tower token stands for, once a stage has merged (CLS included)
        self._captured: dict[str, torch.Tensor] = {}
        self._attention_kwargs: dict | None = None
        self.question_ids: torch.Tensor | None = None
        self.begin_image_pass()
        self.begin_llm_pass(None, 0, 0)
        self._register()

    # --- per-pass state -----------------------------------------------------------------
    def begin_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     exclude: torch.Tensor | None = None) -> None:
        """Remember where each row's question is, for methods that read it.

        input_ids, attention_mask: ``(B, L)`` left-padded prompts. exclude: optional ``(B, L)``
        positions that are not question (the answers of a teacher-forced training sequence,
        which a method must never see). Questions follow the image run, so they are the last
        ``T`` columns of every row, before and after any visual tokens are removed.
        """
        question = self.bb.layout(input_ids, attention_mask).question_mask
        if exclude is not None:
            question = question & ~exclude.bool()
        first = int(question.int().argmax(1)[question.any(1)].min()) if bool(question.any()) else input_ids.shape[1]
        self.question_ids = input_ids[:, first:]
        self.question_valid = question[:, first:]

    def _question_before_llm(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bb.model.get_input_embeddings()(self.question_ids), self.question_valid

    def _question_in_llm(self, hidden: torch.Tensor):
        def get() -> tuple[torch.Tensor, torch.Tensor]:
            t = self.question_ids.shape[1]
            return hidden[:, hidden.shape[1] - t:], self.question_valid
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
        self.drops: list[_Drop] = []  # hard: removals inside the LLM, in layer order
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
        hooks, bb = self.handle.hooks, self.bb
        hooks.append(bb.vision_layers[0].register_forward_pre_hook(self._tower_start))
        for site, st in self.stages.items():
            needs = set(st.method.signals) | set(st.method.optional_signals)
            if site in self.plan.schedules:
                continue  # merging inside blocks reads each block's own keys (BlockMerger)
            if site.before_llm:
                source = site.layer - 1 if site.stage == "vision" else bb.feature_hidden_index - 1
                if {"cls_attention", "keys"} & needs:
                    attn = bb.vision_layers[source].self_attn
                    hooks.append(attn.k_proj.register_forward_hook(self._capture_vision(str(site), attn)))
                if site.stage != "vision" and {"last_block_cls_attention", "last_block_keys"} & needs:
                    attn = bb.vision_layers[-1].self_attn
                    hooks.append(attn.k_proj.register_forward_hook(self._capture_last_block(str(site), attn)))
                if site.stage == "projector" and "cls_token" in needs and not bb.keeps_cls:
                    hooks.append(bb.vision_layers[source].register_forward_hook(self._capture_cls_token(str(site))))
            if not site.before_llm and {"text_attention", "prev_layer_keys", "post_image_attention"} & needs:
                attn = bb.llm_layers[site.layer - 1].self_attn
                hooks.append(attn.register_forward_pre_hook(self._remember_attention_kwargs, with_kwargs=True))
                hooks.append(attn.k_proj.register_forward_hook(self._capture_llm(str(site), attn, needs)))
        if any("input_image_embeddings" in st.method.signals for st in self.stages.values()):
            self._entry = None  # the LLM's input, before any drop inside it
            hooks.append(bb.llm_layers[0].register_forward_pre_hook(self._capture_entry, with_kwargs=True))
        vision = sorted(s.layer for s in self.stages if s.stage == "vision")
        if vision:
            for i in range(vision[0], len(bb.vision_layers)):
                hooks.append(bb.vision_layers[i].register_forward_pre_hook(self._vision_layer(i)))
        self._install_merges()
        if any(s.stage == "projector" for s in self.stages):
            hooks.append(bb.projector.register_forward_pre_hook(self._projector))
        if any(str(s) == "llm.0" for s in self.stages):
            hooks.append(bb.projector.register_forward_hook(self._after_projector))
        llm = sorted(s.layer for s in self.stages if not s.before_llm)
        if llm or self.mode == "soft":
            # A soft stage before the LLM may weight its tokens as keys from the first LLM layer on.
            soft_before = self.mode == "soft" and any(s.stage != "vision" and s.before_llm for s in self.stages)
            first = 0 if soft_before else llm[0] if llm else len(bb.llm_layers)
            for k in range(first, len(bb.llm_layers)):
                hooks.append(bb.llm_layers[k].register_forward_pre_hook(self._llm_layer(k), with_kwargs=True))

    def _tower_start(self, _module, args):
        if self.handle.active:
            self.begin_image_pass()
            self.sizes.value = None

    def _install_merges(self) -> None:
        """In-block stages, after the cuts' pre-hooks (a block's proportional-attention bias must
        see the tokens a cut left)."""
        for site, schedule in sorted(self.plan.schedules.items(), key=lambda item: item[0].layer):
            st = self.stages[site]
            if not any(schedule.values()):  # the budget keeps every token: reported, nothing merges
                self.handle.hooks.append(self.bb.vision_layers[site.layer].register_forward_pre_hook(
                    lambda _m, args, site=site: self._merged(site)(site.layer, None) if self.handle.active else None))
                continue
            merger = BlockMerger(self.bb.vision_layers, schedule, class_token=True, prop_attn=st.method.prop_attn,
                                 sizes=self.sizes, active=lambda: self.handle.active, on_merge=self._merged(site),
                                 scoring=self.handle.scoring)
            self.handle.hooks.extend(merger.install())

    def _merged(self, site):
        """After each merging block of the in-block stage at ``site``: follow the patches behind the
        tower's tokens (in ToMe's order, which the LLM receives), and report the stage after its last."""
        schedule, (n, _) = self.plan.schedules[site], self.plan.counts[site]
        last = max((block for block, r in schedule.items() if r > 0), default=site.layer)

        def fn(block: int, order: torch.Tensor | None) -> None:
            if order is not None:
                origin = self.tower_origin if self.tower_origin is not None else torch.arange(
                    order.shape[1] - 1 + schedule[block], device=order.device).expand(order.shape[0], -1)
                self.tower_origin = origin.gather(1, order[:, 1:] - 1)  # CLS stays first
            if block == last:
                b = order.shape[0] if order is not None else self._batch
                if self.tower_origin is None:
                    self.tower_origin = torch.arange(n).expand(b, -1)
                self.plan.record_merged(self.handle, site, b, self.tower_origin)
        return fn

    # Signals are computed in forward hooks on the layer's own k_proj, so keys are not recomputed.
    def _capture_vision(self, key: str, attn):
        def hook(_k_proj, args, keys):
            if not self.handle.active:
                return
            hidden = args[0]  # (B, T, d): the block's normalised input
            with self.handle.scoring():
                self._captured[key + ":cls_attention"] = layer_cls_attention(
                    hidden, attn.q_proj, keys, attn.num_heads, attn.scale, self._vision_key_bias())
                b, t, _ = keys.shape
                self._captured[key + ":keys"] = keys.view(b, t, attn.num_heads, -1).mean(2)
        return hook

    def _capture_entry(self, _layer, args, kwargs):
        """The LLM's input embeddings ``(B, L, d)`` of a prefill (what the image run and the text were
        before any drop inside the LLM)."""
        if self.handle.active and not self._is_decoding(kwargs, 0):
            self._entry = (args[0] if args else kwargs["hidden_states"], self.image_count)

    def _capture_last_block(self, key: str, attn):
        """PruMerge's signal: the last block's CLS attention as one head over the full width
        (softmax of ``q_cls . k / sqrt(d)``) and its full-width keys, without CLS."""
        def hook(_k_proj, args, keys):
            if not self.handle.active:
                return
            hidden = args[0]  # (B, T, d): the block's normalised input
            with self.handle.scoring():
                scale = hidden.shape[-1] ** -0.5
                self._captured[key + ":last_block_cls_attention"] = layer_cls_attention(
                    hidden, attn.q_proj, keys, 1, scale, self._vision_key_bias())
                self._captured[key + ":last_block_keys"] = keys
        return hook

    def _capture_cls_token(self, key: str):
        """The CLS state the feature layer outputs ``(B, d)``, which LLaVA's default strategy drops."""
        def hook(_layer, _args, output):
            if self.handle.active:
                hidden = output[0] if isinstance(output, tuple) else output
                self._captured[key + ":cls_token"] = hidden[:, 0]
        return hook

    def _vision_key_bias(self) -> torch.Tensor | None:
        return None if self.vision_bias is None else self.vision_bias[:, 0, 0]

    def _remember_attention_kwargs(self, attn, args, kwargs):
        """The rotary tables and mask the k_proj hook needs (None while decoding: no signal then)."""
        decoding = self._is_decoding(kwargs, attn.layer_idx)
        self._attention_kwargs = None if decoding or not self.handle.active else kwargs

    def _capture_llm(self, key: str, attn, needs: set):
        def hook(_k_proj, args, keys):
            if self._attention_kwargs is not None:
                with self.handle.scoring():
                    if "text_attention" in needs:
                        self._captured[key + ":text_attention"] = last_query_attention(
                            attn, args[0], keys, self._attention_kwargs)
                    if "prev_layer_keys" in needs:
                        self._captured[key + ":prev_layer_keys"] = rotated_keys(attn, keys, self._attention_kwargs)
                    if "post_image_attention" in needs and self.question_ids is not None:
                        # every token after the image queries: (B, T, L), kept apart from token signals
                        self._captured[key + "#post_image_attention"] = last_queries_attention(
                            attn, args[0], keys, self._attention_kwargs, self.question_ids.shape[1])
        return hook

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
        known = self.question_ids is not None
        with self.handle.scoring():
            inputs = SiteInputs(tokens, keep, str(site), lambda: row_generator(self.seed, tokens, valid), signals,
                                question if known else None, valid, question_signals if known else {},
                                self._question_text if known and self.bb.processor is not None else None)
            sel = st.method.select(inputs)
            rebuilt = self.mode == "hard" and site.before_llm and site.stage != "vision"  # the run the LLM gets
            if sel.order is not None and not rebuilt:
                raise TokensieveError(f"{st.method.name} at {site}: an order of its own goes into the image run "
                                      "before the LLM (projector, llm.0), in hard mode only")
            inserted = self.mode == "hard" and not site.before_llm and getattr(st.method, "renumbers_positions", False)
            if sel.extra is not None and not (rebuilt or inserted):
                raise TokensieveError(f"{st.method.name} at {site}: tokens of its own go into the image run before "
                                      "the LLM (projector, llm.0), or inside it with positions renumbered, in hard "
                                      "mode only")
            sel = self.plan.settle(site, sel, b, n, keep, valid)
        self.plan.record(self.handle, site, sel, n, valid)
        return sel

    def _question_text(self) -> list[str]:
        """Each row's question, decoded from its token ids, without the cue that opens the answer
        (LLaVA's "ASSISTANT:"), which is the prompt's, not the user's."""
        tokenizer = self.bb.processor.tokenizer
        texts = [tokenizer.decode(ids[valid], skip_special_tokens=True)
                 for ids, valid in zip(self.question_ids, self.question_valid)]
        return [ANSWER_CUE.sub("", text).strip() for text in texts]

    def _signals(self, key: str, alive: torch.Tensor | None, offset: int) -> dict:
        """Captured signals over the candidate tokens: columns ``offset..``, then only the
        ``alive`` ``(B, n)`` ones among those, if given (signals of a whole row as they are)."""
        def pick(name):
            def get():
                full = self._captured[f"{key}:{name}"]
                if name in ROW_SIGNALS:
                    return full
                full = full[:, offset:]
                if alive is None:
                    return full
                index = alive if full.dim() == 2 else alive[..., None].expand(-1, -1, full.shape[-1])
                return full.gather(1, index)
            return get
        prefix = key + ":"
        return {name[len(prefix):]: pick(name[len(prefix):]) for name in self._captured if name.startswith(prefix)}

    def _vision_layer(self, i: int):
        site = Site("vision", i)

        def hook(_module, args):
            if not self.handle.active:
                return None
            hidden, mask = args[0], args[1] if len(args) > 1 else None
            self._batch = hidden.shape[0]
            if site in self.stages and site not in self.plan.schedules:
                hidden = self._reduce_tower(site, hidden, key=str(site), prefix=self.bb.prefix_tokens(site))
            if self.vision_bias is not None:
                bias = self.vision_bias.to(hidden.dtype)
                mask = bias if mask is None else mask + bias
            return (hidden, mask, *args[2:])
        return hook

    def _projector(self, _module, args):
        if not self.handle.active:
            return None
        site = Site("projector")
        return (self._reduce_tower(site, args[0], key="projector", prefix=self.bb.prefix_tokens(site)), *args[1:])

    def _after_projector(self, _module, args, output):
        if not self.handle.active:
            return None
        site = Site("llm", 0)
        prefix = self.bb.prefix_tokens(site)
        return self._reduce_tower(site, output, key="llm.0", prefix=prefix,
                                  own={"projector_input": args[0][:, prefix:]})

    def _reduce_tower(self, site, hidden: torch.Tensor, key: str, prefix: int,
                      own: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Vision-side stage on ``hidden`` ``(B, prefix + N, d)``; hard shortens it. own: signals of
        this site ``(B, N, ...)`` over its ``N`` tokens (the projector's input at ``llm.0``)."""
        b = hidden.shape[0]
        patches = hidden[:, prefix:]
        alive = self.patch_alive if self.mode == "soft" else None

        def candidates_of(x: torch.Tensor) -> torch.Tensor:
            return x if alive is None else x.gather(1, alive[..., None].expand(-1, -1, x.shape[-1]))

        candidates = candidates_of(patches)
        signal_offset = 1  # captured tower signals always include CLS at column 0
        signals = self._signals(key, alive, signal_offset)
        signals.update({name: (lambda x=x: candidates_of(x)) for name, x in (own or {}).items()})
        sel = self._choose(site, candidates, signals, self._question_before_llm)
        if sel.key_mask is not None and self.mode == "soft" and site.stage == "vision":
            raise TokensieveError(f"{self.stages[site].method.name} at {site}: a soft key mask is only "
                                  "supported at the projector and inside the LLM")
        values = sel.tokens if sel.tokens is not None else candidates.gather(
            1, sel.indices[..., None].expand(-1, -1, candidates.shape[-1]))
        if self.mode == "hard":
            origin = self.tower_origin if self.tower_origin is not None else torch.arange(
                patches.shape[1], device=hidden.device).expand(b, -1)
            origin = origin.gather(1, sel.indices)
            if sel.order is not None:  # the paper's emission order
                values, origin = gather_tokens(values, sel.order), origin.gather(1, sel.order)
            if sel.extra is not None:  # tokens the method made join the run, marked as such
                made = origin.new_full(sel.extra.shape[:2], EXTRA)
                extra = sel.extra.to(values.dtype)
                values = torch.cat([extra, values] if sel.extra_first else [values, extra], 1)
                origin = torch.cat([made, origin] if sel.extra_first else [origin, made], 1)
            self.tower_origin = origin
            self._record_kept(site, self.tower_origin)
            if site.stage == "vision" and self.sizes.value is not None:  # kept tokens keep what they stand for
                sizes = self.sizes.value
                self.sizes.value = torch.cat([sizes[:, :prefix], sizes[:, prefix:].gather(1, sel.indices)], 1)
            return torch.cat([hidden[:, :prefix], values], 1)
        chosen = sel.indices if alive is None else alive.gather(1, sel.indices)  # into all N patches
        self._record_kept(site, chosen)
        self.patch_alive = chosen
        if self.mode == "soft" and site.stage != "vision":
            self.patch_key_mask = sel.key_mask
        patches = patches.scatter(1, chosen[..., None].expand(-1, -1, patches.shape[-1]), values)
        if site.stage == "vision":
            keep = torch.ones(b, hidden.shape[1], dtype=torch.bool, device=hidden.device)
            keep[:, prefix:] = False
            keep[:, prefix:].scatter_(1, chosen, True)
            self.vision_bias = log_mask(keep, hidden.dtype)[:, None, None, :]
        return torch.cat([hidden[:, :prefix], patches], 1)

    # --- inside the LLM -----------------------------------------------------------------
    @staticmethod
    def _is_decoding(kwargs: dict, layer: int) -> bool:
        cache = kwargs.get("past_key_values")
        return cache is not None and cache.get_seq_length(layer) > 0

    def _llm_layer(self, k: int):
        site = Site("llm", k)

        def hook(_module, args, kwargs):
            if not self.handle.active:
                return None
            if self.image_start is None:
                raise TokensieveError("tokens pruned inside the LLM need the image layout: run the model "
                                      "through LlavaBackbone.forward or .generate")
            hidden = args[0] if args else kwargs.pop("hidden_states")
            args = args[1:]
            decoding = self._is_decoding(kwargs, k)
            if site in self.stages and not site.before_llm and not decoding:  # llm.0 acted at the projector
                hidden = self._reduce_llm(site, hidden, kwargs)
            kwargs = self._adjust_llm_kwargs(k, hidden, kwargs, decoding)
            return (hidden, *args), kwargs
        return hook

    def _reduce_llm(self, site, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        b, length, d = hidden.shape
        start = self.image_start.to(hidden.device)
        columns = start[:, None] + torch.arange(self.image_count, device=hidden.device)  # (B, n_img)
        alive = self.image_alive if self.mode == "soft" else None
        if alive is not None:
            columns = columns.gather(1, alive)
        tokens = hidden.gather(1, columns[..., None].expand(-1, -1, d))
        signals = self._signals(str(site), columns, 0)
        norm = self.bb.language_model.norm
        t = 0 if self.question_ids is None else self.question_ids.shape[1]
        positions = self._positions(kwargs, b)  # (B, L) position id of every current column
        signals["normed_states"] = lambda: norm(tokens)
        signals["positions"] = lambda: positions.gather(1, columns)
        signals["layer_text_attention"] = lambda: self._layer_text_attention(site.layer, hidden, kwargs).gather(1, columns)
        question_signals = {"normed_states": lambda: norm(self._question_in_llm(hidden)()[0]),
                            "positions": lambda: positions[:, length - t:]}
        if f"{site}:prev_layer_keys" in self._captured:
            question_signals["prev_layer_keys"] = lambda: self._captured[f"{site}:prev_layer_keys"][:, length - t:]
        if f"{site}#post_image_attention" in self._captured:  # (B, T, L) -> the image tokens' columns
            rows = self._captured[f"{site}#post_image_attention"]
            signals["post_image_attention"] = lambda: rows.gather(2, columns[:, None, :].expand(-1, rows.shape[1], -1))
        if "input_image_embeddings" in self.stages[site].method.signals:
            entry, count = self._entry
            run = start[:, None] + torch.arange(count, device=hidden.device)
            signals["input_image_embeddings"] = lambda: entry.gather(1, run[..., None].expand(-1, -1, d))
            question_signals["input_embeddings"] = lambda: entry[:, entry.shape[1] - t:]
        sel = self._choose(site, tokens, signals, self._question_in_llm(hidden), self.image_valid, question_signals)
        kept_columns = columns.gather(1, sel.indices)
        kept_run = kept_columns - start[:, None]  # positions in the image run as the LLM received it
        origin = self.run_origin.gather(1, kept_run)
        origin = origin if sel.valid is None else origin.masked_fill(~sel.valid, PADDING)
        if sel.extra is not None:  # the tokens it made, after the kept ones
            made = origin.new_full(sel.extra.shape[:2], EXTRA)
            origin = torch.cat([origin, made if sel.extra_valid is None else made.masked_fill(~sel.extra_valid, PADDING)], 1)
        self._record_kept(site, origin)
        self.image_valid = sel.valid
        if self.mode == "hard":
            self.run_origin = self.run_origin.gather(1, sel.indices)
        if sel.tokens is not None:
            hidden = hidden.scatter(1, kept_columns[..., None].expand(-1, -1, d), sel.tokens)
        if self.mode == "hard":
            return self._remove(site, hidden, columns, kept_columns, sel, kwargs)
        base = self.image_alive if self.image_alive is not None else torch.arange(
            self.image_count, device=hidden.device).expand(b, -1)
        self.image_alive = base.gather(1, sel.indices)
        keep = torch.ones(b, length, dtype=torch.bool, device=hidden.device)
        kept = sel.valid if sel.valid is not None else torch.ones_like(kept_columns, dtype=torch.bool)
        keep.scatter_(1, columns, False).scatter_(1, kept_columns, kept)
        bias = log_mask(keep, hidden.dtype)
        if sel.key_mask is not None:
            weights = soft_key_bias(sel.key_mask, hidden.dtype).masked_fill(~kept, most_negative(hidden.dtype))
            bias = bias.scatter(1, kept_columns, weights)
        self.biases.append((site.layer, bias))
        return hidden

    def _remove(self, site, hidden: torch.Tensor, columns: torch.Tensor, kept_columns: torch.Tensor,
                sel: Selection, kwargs: dict) -> torch.Tensor:
        """Hard mode: the sequence without the image tokens ``sel`` dropped, with the tokens it made
        (``sel.extra``) right after the kept ones. Slots that only pad a row stay, masked as keys."""
        b, length, d = hidden.shape
        here = torch.arange(length, device=hidden.device).expand(b, length)
        drop = torch.zeros(b, length, dtype=torch.bool, device=hidden.device)
        drop.scatter_(1, columns, True).scatter_(1, kept_columns, False)
        local = here[~drop].view(b, -1)  # (B, L'): every row drops the same count
        previous = self.drops[-1] if self.drops else None
        kept_hidden = hidden.gather(1, local[..., None].expand(-1, -1, d))
        original = (previous.columns if previous else here).gather(1, local)  # current -> original columns
        key_bias = None if previous is None or previous.key_bias is None else previous.key_bias.gather(1, local)
        start, kept = self.image_start.to(hidden.device), sel.indices.shape[1]
        valid = sel.valid
        if sel.extra is not None:
            made = sel.extra.shape[1]
            at = torch.arange(length - (columns.shape[1] - kept) + made, device=hidden.device).expand(b, -1)
            after = at - (start + kept)[:, None]  # where the made tokens go: right after the kept ones
            source = torch.where(after < 0, at, torch.where(after < made, local.shape[1] + after, at - made))
            kept_hidden = torch.cat([kept_hidden, sel.extra.to(hidden.dtype)], 1).gather(
                1, source[..., None].expand(-1, -1, d))
            # A made token has no original column: it takes the image run's first (a real token's),
            # which is all that is read of it: positions are renumbered and the mask is built by order.
            is_made = (after >= 0) & (after < made)
            carried = original.gather(1, torch.where(is_made, 0, source))  # elsewhere: < L'
            original = torch.where(is_made, (previous.columns if previous else here).gather(1, start[:, None]), carried)
            if key_bias is not None:
                key_bias = torch.cat([key_bias, key_bias.new_zeros(b, made)], 1).gather(1, source)
            if valid is not None or sel.extra_valid is not None:
                valid = torch.cat([sel.valid if sel.valid is not None else torch.ones_like(sel.indices, dtype=torch.bool),
                                   sel.extra_valid if sel.extra_valid is not None else
                                   torch.ones(b, made, dtype=torch.bool, device=hidden.device)], 1)
            self.run_origin = torch.cat([self.run_origin, self.run_origin.new_full((b, made), EXTRA)], 1)
            local = None  # positions are renumbered: no earlier position map to carry
        if valid is not None:  # padding stays in the sequence as a key no later layer attends to
            slots = start[:, None] + torch.arange(valid.shape[1], device=hidden.device)
            padding = torch.where(valid, 0.0, most_negative(hidden.dtype)).to(hidden.dtype)
            key_bias = torch.zeros(b, original.shape[1], dtype=hidden.dtype, device=hidden.device) \
                if key_bias is None else key_bias
            key_bias = key_bias.scatter(1, slots, padding)
        self.image_valid = None if valid is None or bool(valid.all()) else valid
        drop = self._drop(site, original, local, kwargs, key_bias)
        drop.inserted = sel.extra is not None or (previous is not None and previous.inserted)
        self.drops.append(drop)
        self.image_count = valid.shape[1] if valid is not None else kept + (0 if sel.extra is None else sel.extra.shape[1])
        return kept_hidden

    def _layer_text_attention(self, k: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """``(B, L)``: the last position's attention at decoder layer ``k`` itself — its own norm and
        q/k on the states entering it, at the positions and mask they have (earlier drops applied)."""
        layer = self.bb.llm_layers[k]
        normed = layer.input_layernorm(hidden)
        current = self._adjust_llm_kwargs(k, hidden, kwargs, decoding=False)
        return last_query_attention(layer.self_attn, normed, layer.self_attn.k_proj(normed), current)

    def _positions(self, kwargs: dict, b: int) -> torch.Tensor:
        """``(B, L)``: the position id of every column still in the sequence (earlier stages' drops
        applied), from the model's original ``position_ids``."""
        positions = kwargs.get("position_ids")
        if positions is None:
            raise TokensieveError("the LLM's layers received no position_ids: run the model through "
                                  "LlavaBackbone.forward or .generate")
        positions = positions.expand(b, -1)
        return positions.gather(1, self.drops[-1].positions) if self.drops else positions

    def _drop(self, site, columns: torch.Tensor, local: torch.Tensor | None, kwargs: dict,
              key_bias: torch.Tensor | None) -> _Drop:
        """The removal before ``site`` keeping the original ``columns`` ``(B, L')`` (``local``: the
        current columns they are). A method whose paper renumbers positions 0..L'-1 closes the
        gaps: each real column takes the position of its rank among the real ones that stay."""
        b, length = columns.shape[0], self.length
        previous = self.drops[-1].positions if self.drops else columns.new_tensor(range(length)).expand(b, -1)
        shift = self.drops[-1].shift if self.drops else columns.new_zeros(b)
        if not getattr(self.stages[site].method, "renumbers_positions", False):
            return _Drop(site.layer, columns, previous.gather(1, local), shift, key_bias)
        original = kwargs["position_ids"].expand(b, -1)
        padding = length - 1 - original[:, -1]  # (B,) left padding: a row's last column is real
        real = columns >= padding[:, None]
        if key_bias is not None:  # slots that only pad a row keeping fewer take no position
            real &= key_bias > most_negative(key_bias.dtype) / 2
        rank = real.long().cumsum(1) - 1
        holding = torch.where(real, padding[:, None] + rank, columns)  # the original column at that position
        return _Drop(site.layer, columns, holding, length - padding - real.sum(1), key_bias)

    def _adjust_llm_kwargs(self, k: int, hidden: torch.Tensor, kwargs: dict, decoding: bool) -> dict:
        """Gather positions/RoPE/mask to the kept tokens (hard); add key biases (soft, and the
        padding of rows that keep fewer tokens in hard).

        Every layer receives the same original tensors from the model, so the adjusted ones are
        computed once per (stages in effect, originals) and reused by the later layers.
        """
        n_drops = sum(drop.layer <= k for drop in self.drops)
        n_biases = sum(layer <= k for layer, _ in self.biases)
        if n_drops == 0 and n_biases == 0:
            return kwargs
        originals = tuple(kwargs.get(name) for name in ("attention_mask", "position_embeddings", "position_ids"))
        cached = self._adjusted.get((n_drops, n_biases, decoding))
        if cached is None or any(a is not b for a, b in zip(cached[0], originals)):
            cached = (originals, self._adjusted_kwargs(n_drops, n_biases, k, hidden, kwargs, decoding))
            self._adjusted[(n_drops, n_biases, decoding)] = cached
        return {**kwargs, **cached[1]}

    def _adjusted_kwargs(self, n_drops: int, n_biases: int, k: int, hidden: torch.Tensor, kwargs: dict,
                         decoding: bool) -> dict:
        drop = self.drops[n_drops - 1] if n_drops else None
        gather = None if drop is None else drop.columns
        active = [b for _, b in self.biases[:n_biases]]  # soft mode's, over the original columns
        bias = torch.stack(active).sum(0).clamp(min=most_negative(hidden.dtype)) if active else None  # (B, L)
        if drop is not None:  # hard mode: the padding of the sequence as it now is
            bias = drop.key_bias
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        b, q = hidden.shape[:2]
        if gather is not None and not decoding:
            original = kwargs["position_ids"].expand(b, -1) if kwargs.get("position_ids") is not None else None
            cos, sin = kwargs["position_embeddings"]
            at = drop.positions  # the original column holding each column's position
            kwargs["position_embeddings"] = tuple(
                t.expand(b, -1, -1).gather(1, at[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"].expand(b, -1).gather(1, at)
            if drop.inserted:  # made tokens have no original column: causal by their order, padding masked
                padded = gather < (self.length - 1 - original[:, -1:])  # left padding: the last column is real
                allowed = torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()[None] & ~padded[:, None, :]
                mask = torch.where(allowed, 0.0, most_negative(hidden.dtype)).to(hidden.dtype)[:, None]
            elif mask is not None:
                mask = mask.expand(b, -1, -1, -1)
                mask = mask.gather(2, gather[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
                mask = mask.gather(3, gather[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
        elif gather is not None:  # decoding: cached K/V of this layer are shorter
            if mask is not None:
                new = torch.arange(self.length, mask.shape[-1], device=mask.device).expand(b, -1)
                columns = torch.cat([gather, new], 1)
                mask = mask.expand(b, -1, -1, -1)
                mask = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
            if bool(drop.shift.any()):  # renumbered positions: new tokens follow the shorter prompt
                positions = kwargs["position_ids"].expand(b, -1) - drop.shift[:, None]
                kwargs["position_ids"] = positions
                kwargs["position_embeddings"] = self.bb.language_model.rotary_emb(hidden, positions)
        if bias is not None:
            keys = bias.shape[1] if not decoding else (mask.shape[-1] if mask is not None else
                                                     kwargs["past_key_values"].get_seq_length(k) + q)
            mask = as_additive(mask, b, q, keys, hidden.dtype, hidden.device)
            extra = keys - bias.shape[1]
            full = torch.cat([bias, bias.new_zeros(b, extra)], 1) if extra > 0 else bias
            mask = (mask + full[:, None, None, :]).clamp(min=most_negative(hidden.dtype))
        kwargs["attention_mask"] = mask
        return {name: kwargs.get(name) for name in ("attention_mask", "position_embeddings", "position_ids")}
