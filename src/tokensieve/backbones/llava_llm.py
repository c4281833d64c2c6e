"""The LLaVA session's stages inside the LLM (``llm.k``, ``k >= 1``): image tokens chosen before
decoder layer ``k``.

``hard`` removes tokens from the sequence (slots that only pad a row keeping fewer stay, masked
as keys); every later layer gets ``position_ids``, the RoPE tables and the 4D mask gathered to the
kept columns, and during cached decoding the mask's key axis remapped to the shorter K/V of those
layers (:mod:`tokensieve.backbones.llama_decoder`). ``soft`` keeps every token and adds
``log(mask)`` to the dropped tokens' key columns from the stage's layer on. A mixin of
:class:`~tokensieve.backbones.llava_pruning.LlavaPruningSession`: it reads and writes the
session's LLM state (``image_start``, ``image_count``, ``image_alive``, ``image_valid``,
``run_origin``, ``drops``, ``biases``).
"""

from __future__ import annotations

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.llama_decoder import (
    adjusted_layer_kwargs,
    drop_before,
    is_decoding,
    log_mask,
    most_negative,
    own_last_query_attention,
    positions_still_there,
    soft_key_bias,
)
from tokensieve.backbones.stage_plan import EXTRA, PADDING
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection
from tokensieve.ops import trues_first


class LLMReductions:
    """Hooks of the stages inside the LLM (mixin of the LLaVA session)."""

    def _register_llm(self) -> None:
        hooks, bb = self.handle.hooks, self.bb
        llm = sorted(s.layer for s in self.stages if not s.before_llm)
        if llm or self.mode == "soft":
            # A soft stage before the LLM may weight its tokens as keys from the first LLM layer on.
            soft_before = self.mode == "soft" and any(s.stage != "vision" and s.before_llm for s in self.stages)
            first = 0 if soft_before else llm[0] if llm else len(bb.llm_layers)
            for k in range(first, len(bb.llm_layers)):
                hooks.append(bb.llm_layers[k].register_forward_pre_hook(self._llm_layer(k), with_kwargs=True))

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
            decoding = is_decoding(kwargs, k)
            if site in self.stages and not site.before_llm and not decoding:  # llm.0 acted at the projector
                hidden = self._reduce_llm(site, hidden, kwargs)
            kwargs = self._adjust_llm_kwargs(k, hidden, kwargs, decoding)
            return (hidden, *args), kwargs
        return hook

    def _reduce_llm(self, site, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The stage at ``site`` on ``hidden`` ``(B, L, d)`` entering its layer, choosing among the image
        run's columns (``(B, n)``, the alive ones in soft mode): hard returns ``(B, L', d)``; soft
        returns ``(B, L, d)`` and keys the dropped columns out of every later layer (``biases``)."""
        b, length, d = hidden.shape
        start = self.image_start.to(hidden.device)
        columns = start[:, None] + torch.arange(self.image_count, device=hidden.device)  # (B, n_img)
        alive = self.image_alive if self.mode == "soft" else None
        if alive is not None:
            columns = columns.gather(1, alive)
        tokens = hidden.gather(1, columns[..., None].expand(-1, -1, d))
        signals = self._signals(str(site), columns, 0)
        norm = self.bb.language_model.norm
        positions = self._positions(kwargs, b)  # (B, L) position id of every current column
        signals["normed_states"] = lambda: norm(tokens)
        signals["positions"] = lambda: positions.gather(1, columns)
        signals["layer_text_attention"] = lambda: self._layer_text_attention(site.layer, hidden, kwargs).gather(1, columns)

        def question_columns() -> slice:  # the question's columns (read only where a method asks)
            return slice(length - self.question_span()[0].shape[1], None)

        question_signals = {"normed_states": lambda: norm(self._question_in_llm(hidden)()[0]),
                            "positions": lambda: positions[:, question_columns()]}
        if f"{site}:prev_layer_keys" in self._captured:
            question_signals["prev_layer_keys"] = lambda: self._captured[f"{site}:prev_layer_keys"][:, question_columns()]
        if f"{site}#post_image_attention" in self._captured:  # (B, T, L) -> the image tokens' columns
            rows = self._captured[f"{site}#post_image_attention"]
            signals["post_image_attention"] = lambda: rows.gather(2, columns[:, None, :].expand(-1, rows.shape[1], -1))
        if "input_image_embeddings" in self.stages[site].method.signals:
            entry, count = self._entry
            run = start[:, None] + torch.arange(count, device=hidden.device)
            signals["input_image_embeddings"] = lambda: entry.gather(1, run[..., None].expand(-1, -1, d))
            question_signals["input_embeddings"] = lambda: entry[:, entry.shape[1] - self.question_span()[0].shape[1]:]
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
        # (B, L'): the columns that stay, in order (every row drops the same count; a stable sort puts
        # them first, where a boolean mask would wait for the device)
        local = trues_first(~drop)[:, :length - columns.shape[1] + sel.indices.shape[1]]
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
            # A made token has no column of its own: it takes the one of the token its method names
            # (extra_at: its position, where positions are kept), else the image run's first (a real
            # token's, which is all that is read of it where positions are renumbered); the mask is
            # then built by order.
            made_at = columns.gather(1, sel.extra_at) if sel.extra_at is not None else start[:, None].expand(-1, made)
            local = torch.cat([local, made_at], 1).gather(1, source)
            original = (previous.columns if previous else here).gather(1, local)
            if key_bias is not None:
                key_bias = torch.cat([key_bias, key_bias.new_zeros(b, made)], 1).gather(1, source)
            if valid is not None or sel.extra_valid is not None:
                valid = torch.cat([sel.valid if sel.valid is not None else torch.ones_like(sel.indices, dtype=torch.bool),
                                   sel.extra_valid if sel.extra_valid is not None else
                                   torch.ones(b, made, dtype=torch.bool, device=hidden.device)], 1)
            self.run_origin = torch.cat([self.run_origin, self.run_origin.new_full((b, made), EXTRA)], 1)
        if valid is not None:  # padding stays in the sequence as a key no later layer attends to
            slots = start[:, None] + torch.arange(valid.shape[1], device=hidden.device)
            padding = torch.where(valid, 0.0, most_negative(hidden.dtype)).to(hidden.dtype)
            key_bias = torch.zeros(b, original.shape[1], dtype=hidden.dtype, device=hidden.device) \
                if key_bias is None else key_bias
            key_bias = key_bias.scatter(1, slots, padding)
        self.image_valid = None if valid is None or bool(valid.all()) else valid
        drop = drop_before(site.layer, previous, original, local, self.length, key_bias,
                           getattr(self.stages[site].method, "renumbers_positions", False), kwargs.get("position_ids"))
        drop.inserted = sel.extra is not None or (previous is not None and previous.inserted)
        self.drops.append(drop)
        self.image_count = valid.shape[1] if valid is not None else kept + (0 if sel.extra is None else sel.extra.shape[1])
        return kept_hidden

    def _layer_text_attention(self, k: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """``(B, L)``: the last position's attention at decoder layer ``k`` itself (earlier drops applied)."""
        return own_last_query_attention(self.bb.llm_layers[k], hidden,
                                        self._adjust_llm_kwargs(k, hidden, kwargs, decoding=False))

    def _positions(self, kwargs: dict, b: int) -> torch.Tensor:
        """``(B, L)``: the position id of every column still in the sequence (earlier stages' drops applied)."""
        return positions_still_there(kwargs, b, self.drops, "LlavaBackbone")

    def _adjust_llm_kwargs(self, k: int, hidden: torch.Tensor, kwargs: dict, decoding: bool) -> dict:
        """Layer ``k``'s kwargs after the removals and with the key biases before it
        (:func:`.llama_decoder.adjusted_layer_kwargs`, cached per pass)."""
        return adjusted_layer_kwargs(self._adjusted, kwargs, hidden, self.drops, self.biases, self.length,
                                     self.bb.language_model.rotary_emb, k, decoding)
