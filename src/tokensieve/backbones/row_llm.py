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
positions, unless the method renumbers positions (gap-free after each drop, 1-D RoPE only: LLaVA-NeXT).
Tokens a method makes (hard mode: SparseVLM's recycled ones) enter right after the row's last image run,
each taking the position of the token ``Selection.extra_at`` names (or its place in the order, where
positions are renumbered); later stages see them as visual tokens after every unit. Rows making fewer
than the most carry slots masked as keys. Qwen3-VL's DeepStack additions after the early layers
follow each row's visual columns (:mod:`.qwen_deepstack`). A mixin of
:class:`~tokensieve.backbones.qwen_pruning.QwenPruningSession` and
:class:`~tokensieve.backbones.anyres_pruning.AnyresPruningSession`: it reads the session's ``bb`` (its
``family_name`` names it in messages), ``handle``, ``plan``, ``seed`` and ``llm_stages``.
"""

from __future__ import annotations

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.call_runs import call_runs
from tokensieve.backbones.llama_decoder import (
    adjusted_layer_kwargs,
    is_decoding,
    last_queries_attention,
    last_query_attention,
    most_negative,
    own_last_query_attention,
    positions_still_there,
    rotated_keys,
    soft_key_bias,
)
from tokensieve.backbones.qwen_layout import QwenLayout, question_columns
from tokensieve.backbones.qwen_units import refuse_video, units_now
from tokensieve.backbones.row_removal import RowRemoval
from tokensieve.backbones.stage_plan import EXTRA, PADDING, row_generator
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection, SiteInputs, VisualUnit

LLM_SIGNALS = frozenset({"text_attention", "prev_layer_keys", "normed_states", "positions", "layer_text_attention",
                         "post_image_attention", "input_image_embeddings"})
CAPTURED = frozenset({"text_attention", "prev_layer_keys"})  # read from layer k-1's own q/k


def masks_nothing(kept: list[torch.Tensor], weights: list[torch.Tensor | None], counts: list[int]) -> bool:
    """True when a stage's choice keeps every token with no key weights: it then adds no bias, and the
    layers run exactly as unpruned. kept, weights, counts: per image or row its kept indices, their key
    weights and its token count."""
    return all(w is None for w in weights) and all(len(k) == n for k, n in zip(kept, counts))


class RowLLMStages(RowRemoval):
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
            needs = (set(st.method.signals) | set(st.method.optional_signals)) & (CAPTURED | {"post_image_attention"})
            if needs:
                attn = layers[site.layer - 1].self_attn
                hooks.append(attn.register_forward_pre_hook(self._remember_attention_kwargs, with_kwargs=True))
                hooks.append(attn.k_proj.register_forward_hook(self._capture(site, attn, needs)))
        if any("input_image_embeddings" in st.method.signals for st in self.llm_stages.values()):
            hooks.append(layers[0].register_forward_pre_hook(self._capture_entry, with_kwargs=True))
        first = min((s.layer for s in self.llm_stages), default=len(layers))
        if self.soft and self.stage is not None:  # soft llm.0 masks its dropped tokens from layer 0 on
            first = 0
        for k in range(first, len(layers)):
            hooks.append(layers[k].register_forward_pre_hook(self._layer_hook(k), with_kwargs=True))

    # --- per-pass state -----------------------------------------------------------------
    def begin_llm_pass(self, layout: QwenLayout, origins: list[torch.Tensor], units: list[list[VisualUnit]],
                       exclude: torch.Tensor | None = None) -> None:
        """Called by the adapter once the LLM input ``(B, L)`` is assembled (left-padded), with its layout
        (its visual runs and question). origins: per row ``(n_b,)`` the index of each of its visual columns
        among the row's visual tokens before any pruning (its units' tokens in prompt order), for
        ``handle.last_kept``; units: per row its images and videos before any pruning
        (:func:`.qwen_units.visual_units`), for ``SiteInputs.units``; exclude: optional ``(B, L)`` columns that
        are not question (a teacher-forced sequence's answers)."""
        device = layout.question_mask.device
        self.length = layout.question_mask.shape[1]
        # Per row, in the sequence as it now is: its visual columns (n_b,) and the columns after its
        # last image (the question and the answer cue, (T_b,)).
        self.visual = [torch.cat([torch.arange(r.start, r.start + r.count, device=device) for r in row])
                       if row else torch.zeros(0, dtype=torch.long, device=device) for row in layout.runs]
        # SparseVLM's raters are the last question_tail columns. Drops and made tokens change only columns
        # before a row's question, so their number stays this one.
        self.question, self.question_tail = question_columns(layout, exclude)
        self.origin = origins
        self.units = units
        self.entering = [torch.arange(len(c), device=device) for c in self.visual]  # of the row's tokens entering
        # (B,) per row the column after its last image run: where tokens a method makes enter.
        self.run_end = torch.tensor([row[-1].start + row[-1].count if row else 0 for row in layout.runs], device=device)
        self._entry: tuple | None = None
        self.drops: list = []
        self._adjusted: dict = {}
        self.biases: list = []  # soft: (layer, (B, L) additive key bias)

    # --- hooks --------------------------------------------------------------------------
    def _capture_entry(self, _layer, args, kwargs):
        """At a prefill's first decoder layer: ``(embeddings (B, L, d), visual, question)``, the LLM's input
        and each row's visual and question columns in it (SparseVLM's raters read them)."""
        if self.handle.active and self.visual is not None and not is_decoding(kwargs, 0):
            self._entry = (args[0] if args else kwargs["hidden_states"], list(self.visual), list(self.question))

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
                if "post_image_attention" in needs:  # (B, Q, L): the last Q columns, every row's question among them
                    self._captured[f"{site}#post_image_attention"] = last_queries_attention(
                        attn, args[0], keys, self._attention_kwargs, self.question_tail)
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

        made = bool(self.drops) and self.drops[-1].inserted  # an earlier stage made tokens
        units = units_now(self.units, self.origin, made)  # per row its units as earlier stages left them
        entry = self._entry  # the image runs and questions as the LLM received them, where a method reads them
        chosen = []
        # rows share a call with as many visual and question columns (and as many where the LLM received them)
        sizes = [(len(v), len(q)) + (() if entry is None else (len(entry[1][r]), len(entry[2][r])))
                 for r, (v, q) in enumerate(zip(self.visual, self.question))]
        for rows in call_runs(sizes, hidden.device):
            index = torch.tensor(rows, device=hidden.device)[:, None]  # (G, 1)
            columns = torch.stack([self.visual[r] for r in rows])  # (G, n)
            question = torch.stack([self.question[r] for r in rows])  # (G, T)
            tokens = hidden[index, columns]  # (G, n, d)
            signals = {"normed_states": lambda t=tokens: norm(t),
                       "positions": lambda i=index, c=columns: positions[i, c],
                       "layer_text_attention": lambda i=index, c=columns: layer_text_attention()[i, c]}
            question_signals = {"normed_states": lambda i=index, q=question: norm(hidden[i, q]),
                                "positions": lambda i=index, q=question: positions[i, q]}
            for name in CAPTURED:
                if f"{site}:{name}" in self._captured:
                    full = self._captured[f"{site}:{name}"]
                    signals[name] = lambda f=full, i=index, c=columns: f[i, c]
                    question_signals[name] = lambda f=full, i=index, q=question: f[i, q]
            if f"{site}#post_image_attention" in self._captured:  # (G, T, n): the question's rows
                full = self._captured[f"{site}#post_image_attention"]
                signals["post_image_attention"] = lambda f=full, i=index, c=columns, q=question: f[
                    i, q - (hidden.shape[1] - f.shape[1])].gather(2, c[:, None].expand(-1, q.shape[1], -1))
            if entry is not None:
                states, visual, asked = entry
                run, said = torch.stack([visual[r] for r in rows]), torch.stack([asked[r] for r in rows])
                signals["input_image_embeddings"] = lambda i=index, v=run: states[i, v]
                question_signals["input_embeddings"] = lambda i=index, a=said: states[i, a]
            asks = (lambda i=index, q=question: (hidden[i, q], torch.ones(q.shape, dtype=torch.bool, device=q.device)))
            chosen += self._choose_rows(site, rows, tokens, [units[r] for r in rows], signals, asks, question_signals,
                                        rows[-1] == b - 1)
        kept, made = [c[0] for c in chosen], [c[2] for c in chosen]
        self._record_llm(site, kept, [len(m) for m in made])
        if self.soft:
            return self._mask_dropped(site, hidden, kept, [c[1] for c in chosen])
        return self._remove(site, hidden, kept, made, [c[3] for c in chosen], kwargs)

    def _choose_rows(self, site: Site, rows: list[int], tokens: torch.Tensor, units: list[list[VisualUnit]],
                     signals: dict, question, question_signals, last: bool) -> list[tuple]:
        """The choice of rows ``rows`` (consecutive, :func:`.call_runs.call_runs`) among their ``n`` visual tokens each,
        ``tokens`` ``(G, n, d)`` (their ``units``), in one call; per row: ``(K_b,)`` increasing indices of those
        that stay, their ``(K_b,)`` key weights in soft mode (None: none given, or hard mode), the ``(C_b, d)``
        tokens the method made and ``(C_b,)`` the index among the ``n`` of the token whose position each takes
        (``C_b = 0`` for most methods); last: the pass's last rows, after which the plan stops checking values."""
        st, (g, n) = self.llm_stages[site], tokens.shape[:2]
        if n == 0:
            raise TokensieveError(f"{st}: row {rows[0]} holds no image or video; every row of a batch pruned inside "
                                  "the LLM needs one")
        if st.budget.count is not None and st.budget.count > n:
            raise TokensieveError(f"{st}: row {rows[0]} holds {n} visual tokens, fewer than the budget of "
                                  f"{st.budget.count}; give a smaller count or a ratio")
        for row, row_units in zip(rows, units):
            refuse_video(st, row_units, f"row {row}")
        keep = self.plan.keep_at(site, n)
        with self.handle.scoring():
            sel = st.method.select(SiteInputs(tokens, keep, str(site), lambda: row_generator(self.seed, tokens),
                                              signals, question, None, question_signals, units=units))
            if sel.tokens is not None or sel.order is not None or (sel.extra is not None and self.soft) or (
                    sel.key_mask is not None and not self.soft):
                raise TokensieveError(f"{st.method.name} at {site}: on {self.bb.family_name} a stage inside the LLM "
                                      "only chooses tokens, and in hard mode may add its own (no new values, order, or "
                                      "key weights outside soft mode)")
            renumbers = getattr(st.method, "renumbers_positions", False)
            if sel.extra is not None and sel.extra_at is None and not renumbers:
                raise TokensieveError(f"{st.method.name} at {site}: tokens of its own need a position to take "
                                      "(Selection.extra_at), since positions are not renumbered")
            sel = self.plan.settle(site, sel, g, n, keep, pass_done=last)
        out = []
        for i in range(g):
            real = slice(None) if sel.valid is None else sel.valid[i]
            made, made_at = tokens[i, :0], torch.zeros(0, dtype=torch.long, device=tokens.device)
            if sel.extra is not None:
                alive = slice(None) if sel.extra_valid is None else sel.extra_valid[i]
                made = sel.extra[i][alive].to(tokens.dtype)
                # where positions are renumbered a made token's place in the order is its position: any real token
                made_at = sel.extra_at[i][alive] if sel.extra_at is not None else made_at.new_zeros(len(made))
            out.append((sel.indices[i][real], None if sel.key_mask is None else sel.key_mask[i][real], made, made_at))
        return out

    def _record_llm(self, site: Site, chosen: list[torch.Tensor], made: list[int]) -> None:
        """Counts per row, and ``handle.last_kept[stage]``: ``(B, K_max)`` each row's kept tokens as
        indices among its visual tokens before any pruning (``EXTRA``, -3, for a token a method made), then
        ``PADDING`` (-2) where it keeps fewer. made: per row how many tokens the method made."""
        device = chosen[0].device
        padded = torch.full((len(chosen), max(len(c) for c in chosen)), PADDING, dtype=torch.long, device=device)
        for row, kept in enumerate(chosen):
            padded[row, : len(kept)] = kept
        counts = [len(c) for c in self.visual]
        real = torch.arange(max(counts), device=device) < torch.tensor(counts, device=device)[:, None]
        made_valid = torch.arange(max(made), device=device) < torch.tensor(made, device=device)[:, None]
        extra = padded.new_zeros(len(made), max(made), 1) if max(made) else None
        self.plan.record(self.handle, site, Selection(padded.clamp(min=0), valid=padded >= 0, extra=extra,
                                                      extra_valid=made_valid if max(made) else None), max(counts), real)
        self.origin = [torch.cat([origin[kept], origin.new_full((m,), EXTRA)])
                       for origin, kept, m in zip(self.origin, chosen, made)]
        origins = torch.full((len(chosen), max(len(o) for o in self.origin)), PADDING, dtype=torch.long, device=device)
        for row, origin in enumerate(self.origin):
            origins[row, : len(origin)] = origin
        self.handle.last_kept[str(self.llm_stages[site])] = origins

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

