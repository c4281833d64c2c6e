"""The stages inside the LLM (``llm.k``, ``k >= 1``) of the sessions that choose row by row (Qwen-VL,
LLaVA-NeXT): visual tokens chosen before decoder layer ``k``, row by row; removed in hard mode
(below), masked as keys in soft mode (below; ``llm.0`` on Qwen-VL: :mod:`.qwen_soft`).

A row's visual tokens are every placeholder column of its images (several images, any sizes, text
between them), so rows differ in count: the stage runs its method on each row alone (``SiteInputs``
of one row, the budget resolved against that row's tokens) and the rows' choices are removed
together. Rows dropping fewer than the most-dropping row keep that many of their dropped columns as
slots masked as keys in every later layer, so all rows stay one length. Later layers get the RoPE
tables (on Qwen-VL already combined from the 3-D M-RoPE ids), the 1-D ``position_ids`` and the mask
gathered to the kept columns, and while decoding the mask's key axis remapped to their shorter K/V
(:mod:`tokensieve.backbones.llama_decoder`): kept tokens keep their rotations, text after them its
positions. Positions are never renumbered. Qwen3-VL's DeepStack additions after the early layers
follow each row's visual columns (:mod:`.qwen_deepstack`). A mixin of
:class:`~tokensieve.backbones.qwen_pruning.QwenPruningSession` and
:class:`~tokensieve.backbones.anyres_pruning.AnyresPruningSession`: it reads the session's ``bb`` (its
``family_name`` names it in messages), ``handle``, ``plan``, ``seed`` and ``llm_stages``.
"""

from __future__ import annotations

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.llama_decoder import (
    adjusted_layer_kwargs,
    drop_before,
    is_decoding,
    last_query_attention,
    most_negative,
    own_last_query_attention,
    positions_still_there,
    rotated_keys,
    soft_key_bias,
)
from tokensieve.backbones.qwen_units import refuse_video, units_now
from tokensieve.backbones.stage_plan import PADDING, row_generator
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection, SiteInputs, VisualUnit

LLM_SIGNALS = frozenset({"text_attention", "prev_layer_keys", "normed_states", "positions", "layer_text_attention"})
CAPTURED = frozenset({"text_attention", "prev_layer_keys"})  # read from layer k-1's own q/k


def masks_nothing(kept: list[torch.Tensor], weights: list[torch.Tensor | None], counts: list[int]) -> bool:
    """True when a stage's choice keeps every token with no key weights: it then adds no bias, and the
    layers run exactly as unpruned. kept, weights, counts: per image or row its kept indices, their key
    weights and its token count."""
    return all(w is None for w in weights) and all(len(k) == n for k, n in zip(kept, counts))


class RowLLMStages:
    """Hooks and per-pass state of the stages inside the LLM (mixin of a session that chooses row by row)."""

    @property
    def soft(self) -> bool:
        """Stages keep every token and mask the dropped ones as keys (:meth:`_mask_dropped`)."""
        return self.handle.mode == "soft"

    def _register_llm(self) -> None:
        hooks, layers = self.handle.hooks, self.bb.llm_layers
        self._captured: dict[str, torch.Tensor] = {}
        self._attention_kwargs: dict | None = None
        self.visual: list[torch.Tensor] | None = None
        for site, st in self.llm_stages.items():
            needs = (set(st.method.signals) | set(st.method.optional_signals)) & CAPTURED
            if needs:
                attn = layers[site.layer - 1].self_attn
                hooks.append(attn.register_forward_pre_hook(self._remember_attention_kwargs, with_kwargs=True))
                hooks.append(attn.k_proj.register_forward_hook(self._capture(site, attn, needs)))
        first = min((s.layer for s in self.llm_stages), default=len(layers))
        if self.soft and self.stage is not None:  # soft llm.0 masks its dropped tokens from layer 0 on
            first = 0
        for k in range(first, len(layers)):
            hooks.append(layers[k].register_forward_pre_hook(self._layer_hook(k), with_kwargs=True))

    # --- per-pass state -----------------------------------------------------------------
    def begin_llm_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       origins: list[torch.Tensor], units: list[list[VisualUnit]],
                       exclude: torch.Tensor | None = None) -> None:
        """Called by the adapter once the LLM input ``(B, L)`` is assembled (left-padded). origins: per
        row ``(n_b,)`` the index of each of its visual columns among the row's visual tokens before any
        pruning (its units' tokens in prompt order), for ``handle.last_kept``; units: per row its images
        and videos before any pruning (:func:`.qwen_units.visual_units`), for ``SiteInputs.units``;
        exclude: optional ``(B, L)`` columns that are not question (a teacher-forced sequence's answers)."""
        layout = self.bb.layout(input_ids, attention_mask)
        device = input_ids.device
        self.length = input_ids.shape[1]
        # Per row, in the sequence as it now is: its visual columns (n_b,) and the columns after its
        # last image (the question and the answer cue, (T_b,)).
        self.visual = [torch.cat([torch.arange(r.start, r.start + r.count, device=device) for r in row])
                       if row else torch.zeros(0, dtype=torch.long, device=device) for row in layout.runs]
        question = layout.question_mask if exclude is None else layout.question_mask & ~exclude
        self.question = [question[b].nonzero().flatten() for b in range(len(layout.runs))]
        self.origin = origins
        self.units = units
        self.entering = [torch.arange(len(c), device=device) for c in self.visual]  # of the row's tokens entering
        self.drops: list = []
        self._adjusted: dict = {}
        self.biases: list = []  # soft: (layer, (B, L) additive key bias)

    # --- hooks --------------------------------------------------------------------------
    def _remember_attention_kwargs(self, attn, _args, kwargs):
        """The rotary tables and mask the k_proj hook needs (None while decoding: no signal then)."""
        decoding = is_decoding(kwargs, attn.layer_idx)
        self._attention_kwargs = None if decoding or not self.handle.active else kwargs

    def _capture(self, site: Site, attn, needs: set):
        def hook(_k_proj, args, keys):
            if self._attention_kwargs is None:
                return
            with self.handle.scoring():
                if "text_attention" in needs:  # (B, L): the last position's attention, mean over heads
                    self._captured[f"{site}:text_attention"] = last_query_attention(
                        attn, args[0], keys, self._attention_kwargs)
                if "prev_layer_keys" in needs:  # (B, L, H_kv * d_head) after RoPE
                    self._captured[f"{site}:prev_layer_keys"] = rotated_keys(attn, keys, self._attention_kwargs)
        return hook

    def _layer_hook(self, k: int):
        site = Site("llm", k)

        def hook(_module, args, kwargs):
            if not self.handle.active:
                return None
            if self.visual is None:
                raise TokensieveError("tokens pruned inside the LLM need the image layout: run the model "
                                      f"through {type(self.bb).__name__}.forward or .generate")
            hidden = args[0] if args else kwargs.pop("hidden_states")
            decoding = is_decoding(kwargs, k)
            if site in self.llm_stages and not decoding:
                hidden = self._reduce(site, hidden, kwargs)
            return (hidden, *args[1:]), self._adjusted_kwargs(k, hidden, kwargs, decoding)
        return hook

    # --- one stage ----------------------------------------------------------------------
    def _reduce(self, site: Site, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The stage at ``site`` on ``hidden`` ``(B, L, d)`` entering its layer: each row chooses among
        its visual columns; returns ``(B, L', d)`` without the dropped columns."""
        b = hidden.shape[0]
        positions = self._positions(kwargs, b)  # (B, L) the 1-D position id of every current column
        norm = self.bb.model.model.language_model.norm
        layer_attention: list[torch.Tensor] = []

        def layer_text_attention() -> torch.Tensor:  # (B, L), computed once for the rows that ask
            if not layer_attention:
                layer_attention.append(self._layer_text_attention(site.layer, hidden, kwargs))
            return layer_attention[0]

        chosen = []
        for row in range(b):
            columns, question = self.visual[row], self.question[row]
            tokens = hidden[row, columns][None]  # (1, n_b, d)
            signals = {"normed_states": lambda t=tokens: norm(t),
                       "positions": lambda r=row, c=columns: positions[r, c][None],
                       "layer_text_attention": lambda r=row, c=columns: layer_text_attention()[r, c][None]}
            question_signals = {"normed_states": lambda r=row, q=question: norm(hidden[r, q][None]),
                                "positions": lambda r=row, q=question: positions[r, q][None]}
            for name in CAPTURED:
                if f"{site}:{name}" in self._captured:
                    full = self._captured[f"{site}:{name}"]
                    signals[name] = lambda f=full, r=row, c=columns: f[r, c][None]
                    question_signals[name] = lambda f=full, r=row, q=question: f[r, q][None]
            states = (lambda r=row, q=question: (hidden[r, q][None],
                                                 torch.ones(1, len(q), dtype=torch.bool, device=hidden.device)))
            chosen.append(self._choose_row(site, row, tokens, signals, states, question_signals, row == b - 1))
        self._record_llm(site, [kept for kept, _ in chosen])
        if self.soft:
            return self._mask_dropped(site, hidden, [kept for kept, _ in chosen], [weight for _, weight in chosen])
        return self._remove(site, hidden, [kept for kept, _ in chosen], kwargs)

    def _choose_row(self, site: Site, row: int, tokens: torch.Tensor, signals: dict, question, question_signals,
                    last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(K_b,)`` increasing indices into row ``row``'s ``n_b`` visual tokens ``tokens`` ``(1, n_b, d)``
        that stay, and their ``(K_b,)`` key weights in soft mode (None: none given, or hard mode);
        last: the pass's last row, after which the plan stops checking values."""
        st, n = self.llm_stages[site], tokens.shape[1]
        if n == 0:
            raise TokensieveError(f"{st}: row {row} holds no image or video; every row of a batch pruned inside the LLM "
                                  "needs one")
        if st.budget.count is not None and st.budget.count > n:
            raise TokensieveError(f"{st}: row {row} holds {n} visual tokens, fewer than the budget of "
                                  f"{st.budget.count}; give a smaller count or a ratio")
        units = units_now(self.units[row], self.origin[row])
        refuse_video(st, units, f"row {row}")
        keep = self.plan.keep_at(site, n)
        with self.handle.scoring():
            sel = st.method.select(SiteInputs(tokens, keep, str(site), lambda: row_generator(self.seed, tokens),
                                              signals, question, None, question_signals, units=[units]))
            if sel.tokens is not None or sel.extra is not None or sel.order is not None or (
                    sel.key_mask is not None and not self.soft):
                raise TokensieveError(f"{st.method.name} at {site}: on {self.bb.family_name} a stage inside the LLM only "
                                      "chooses tokens (no new values, tokens of its own, order, or key weights "
                                      "outside soft mode)")
            sel = self.plan.settle(site, sel, 1, n, keep, pass_done=last)
        real = slice(None) if sel.valid is None else sel.valid[0]
        return sel.indices[0][real], None if sel.key_mask is None else sel.key_mask[0][real]

    def _record_llm(self, site: Site, chosen: list[torch.Tensor]) -> None:
        """Counts per row, and ``handle.last_kept[stage]``: ``(B, K_max)`` each row's kept tokens as
        indices among its visual tokens before any pruning, then ``PADDING`` (-2) where it keeps fewer."""
        device = chosen[0].device
        padded = torch.full((len(chosen), max(len(c) for c in chosen)), PADDING, dtype=torch.long, device=device)
        for row, kept in enumerate(chosen):
            padded[row, : len(kept)] = kept
        counts = [len(c) for c in self.visual]
        real = torch.arange(max(counts), device=device) < torch.tensor(counts, device=device)[:, None]
        self.plan.record(self.handle, site, Selection(padded.clamp(min=0), valid=padded >= 0), max(counts), real)
        self.origin = [origin[kept] for origin, kept in zip(self.origin, chosen)]
        origins = torch.full_like(padded, PADDING)
        for row, origin in enumerate(self.origin):
            origins[row, : len(origin)] = origin
        self.handle.last_kept[str(self.llm_stages[site])] = origins

    def _remove(self, site: Site, hidden: torch.Tensor, chosen: list[torch.Tensor], kwargs: dict) -> torch.Tensor:
        """``hidden`` ``(B, L, d)`` without each row's dropped visual columns. A row dropping ``f`` more
        than the row dropping fewest keeps ``f`` of them as slots masked as keys (the rows stay one
        length, and a row's tokens attend as they would alone)."""
        b, length, d = hidden.shape
        dropping = [len(c) - len(k) for c, k in zip(self.visual, chosen)]
        least = min(dropping)
        if max(dropping) == 0:  # every row keeps every token: nothing to remove
            return hidden
        gone = torch.zeros(b, length, dtype=torch.bool, device=hidden.device)
        fillers = []
        for row, (columns, kept) in enumerate(zip(self.visual, chosen)):
            dropped = torch.ones(len(columns), dtype=torch.bool, device=hidden.device)
            dropped[kept] = False
            dropped = columns[dropped]
            extra = dropping[row] - least
            fillers.append(dropped[:extra])
            gone[row, dropped[extra:]] = True
        local = gone.to(torch.uint8).argsort(dim=1, stable=True)[:, :length - least]  # (B, L'): columns that stay
        moved = (~gone).long().cumsum(1) - 1  # (B, L) each staying column's index in the shorter sequence
        previous = self.drops[-1] if self.drops else None
        here = torch.arange(length, device=hidden.device).expand(b, length)
        original = (previous.columns if previous else here).gather(1, local)
        key_bias = None if previous is None or previous.key_bias is None else previous.key_bias.gather(1, local)
        if any(len(f) for f in fillers):
            key_bias = hidden.new_zeros(b, length - least) if key_bias is None else key_bias
            for row, filler in enumerate(fillers):
                key_bias[row, moved[row, filler]] = most_negative(hidden.dtype)
        self.drops.append(drop_before(site.layer, previous, original, local, self.length, key_bias, False,
                                      kwargs.get("position_ids")))
        self.visual = [moved[row, columns[kept]] for row, (columns, kept) in enumerate(zip(self.visual, chosen))]
        self.entering = [entering[kept] for entering, kept in zip(self.entering, chosen)]
        self.question = [moved[row, q] for row, q in enumerate(self.question)]
        return hidden.gather(1, local[..., None].expand(-1, -1, d))

    def _mask_dropped(self, site: Site, hidden: torch.Tensor, chosen: list[torch.Tensor],
                      weights: list[torch.Tensor | None]) -> torch.Tensor:
        """A stage inside the LLM in soft mode: ``hidden`` ``(B, L, d)`` as it is, and from layer ``k`` on
        each row's alive visual columns not in ``chosen`` (``(K_b,)`` indices among them) masked as keys,
        the chosen ones weighted by ``weights`` (``(K_b,)`` key_mask weights, or None: 1)."""
        if masks_nothing(chosen, weights, [len(c) for c in self.visual]):
            return hidden
        dtype = hidden.dtype
        bias = hidden.new_zeros(hidden.shape[:2])
        for row, (columns, kept, weight) in enumerate(zip(self.visual, chosen, weights)):
            bias[row, columns] = most_negative(dtype)
            bias[row, columns[kept]] = 0.0 if weight is None else soft_key_bias(weight, dtype)
        self.biases.append((site.layer, bias))
        self.visual = [columns[kept] for columns, kept in zip(self.visual, chosen)]
        return hidden

    # --- what a layer receives ----------------------------------------------------------
    def _layer_text_attention(self, k: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """``(B, L)``: the last position's attention at decoder layer ``k`` itself (earlier drops applied)."""
        return own_last_query_attention(self.bb.llm_layers[k], hidden,
                                        self._adjusted_kwargs(k, hidden, kwargs, decoding=False))

    def _positions(self, kwargs: dict, b: int) -> torch.Tensor:
        """``(B, L)``: the 1-D position id (the text row of the 4-row ids) of every current column."""
        return positions_still_there(kwargs, b, self.drops, type(self.bb).__name__)

    def _adjusted_kwargs(self, k: int, hidden: torch.Tensor, kwargs: dict, decoding: bool) -> dict:
        """Layer ``k``'s kwargs after the removals and with the key biases before it
        (:func:`.llama_decoder.adjusted_layer_kwargs`, cached per pass)."""
        return adjusted_layer_kwargs(self._adjusted, kwargs, hidden, self.drops, self.biases, self.length,
                                     self.bb.model.model.language_model.rotary_emb, k, decoding)
