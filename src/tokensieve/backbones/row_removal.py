"""Hard mode's removal inside the LLM for the sessions that choose row by row (:mod:`.row_llm`): each row's
dropped visual columns leave the sequence, and the tokens a method made enter right after the row's last
image run.

Rows stay one length: a row dropping more than the row dropping fewest keeps that many of its dropped
columns as slots masked as keys, and a row making fewer tokens than the most as many masked slots after its
own. Later layers receive what :func:`.llama_decoder.drop_before` says (positions kept, or renumbered
without gaps); a made token takes the position of the visual token its method names, and the causal mask
is then built by the new order. A mixin of :class:`.row_llm.RowLLMStages`: it reads and updates the pass's
``visual``, ``question``, ``entering``, ``run_end`` and ``drops``.
"""

from __future__ import annotations

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.llama_decoder import drop_before, most_negative
from tokensieve.backbones.stage_plan import EXTRA
from tokensieve.ops import complement, trues_first


class RowRemoval:
    """Removing dropped columns and inserting made tokens (mixin of the row-wise LLM stages)."""

    def _remove(self, site: Site, hidden: torch.Tensor, chosen: list[torch.Tensor], made: list[torch.Tensor],
                made_at: list[torch.Tensor], kwargs: dict) -> torch.Tensor:
        """``hidden`` ``(B, L, d)`` without each row's dropped visual columns, and with the ``(C_b, d)`` tokens
        ``made`` in a row right after its last image run, each taking the position of its visual token
        ``made_at`` ``(C_b,)``. A row dropping ``f`` more than the row dropping fewest keeps ``f`` of them as
        slots masked as keys, and a row making fewer than the most as many masked slots after its own (the
        rows stay one length, and a row's tokens attend as they would alone)."""
        b, length, d = hidden.shape
        device = hidden.device
        dropping = [len(c) - len(k) for c, k in zip(self.visual, chosen)]
        least, most_made = min(dropping), max(len(m) for m in made)
        if max(dropping) == 0 and most_made == 0:  # every row keeps every token: nothing to remove
            return hidden
        gone = torch.zeros(b, length, dtype=torch.bool, device=device)
        fillers = []
        for row, (columns, kept) in enumerate(zip(self.visual, chosen)):
            dropped = columns[complement(kept[None], len(columns))[0]]  # in order, with no read
            extra = dropping[row] - least
            fillers.append(dropped[:extra])
            gone[row, dropped[extra:]] = True
        local = trues_first(~gone)[:, :length - least]  # (B, L'): columns that stay
        moved = (~gone).long().cumsum(1) - 1  # (B, L) each staying column's index in the shorter sequence
        previous = self.drops[-1] if self.drops else None
        here = torch.arange(length, device=device).expand(b, length)
        key_bias = None if previous is None or previous.key_bias is None else previous.key_bias.gather(1, local)
        if any(len(f) for f in fillers):
            key_bias = hidden.new_zeros(b, length - least) if key_bias is None else key_bias
            for row, filler in enumerate(fillers):
                key_bias[row, moved[row, filler]] = most_negative(hidden.dtype)
        kept_hidden = hidden.gather(1, local[..., None].expand(-1, -1, d))
        visual = [moved[row, columns[kept]] for row, (columns, kept) in enumerate(zip(self.visual, chosen))]
        question = [moved[row, q] for row, q in enumerate(self.question)]
        at = moved.gather(1, (self.run_end[:, None] - 1).clamp(min=0))[:, 0] + 1  # (B,) where its last image run ends
        if most_made:
            # (B, C): the current column whose position each made slot takes (a padding slot: any real one)
            sources = torch.stack([torch.cat([columns[m_at], columns[:1].expand(most_made - len(m_at))])
                                   for columns, m_at in zip(self.visual, made_at)])
            padding = torch.stack([torch.arange(most_made, device=device) >= len(m) for m in made])
            local, kept_hidden, key_bias = self._insert(local, kept_hidden, key_bias, at, sources, padding, made)
            visual = [torch.cat([v, a + torch.arange(len(m), device=device)]) for v, a, m in zip(visual, at, made)]
            question = [q + most_made for q in question]
            at = at + most_made
        self.run_end = at
        original = (previous.columns if previous else here).gather(1, local)
        renumber = getattr(self.llm_stages[site].method, "renumbers_positions", False)
        drop = drop_before(site.layer, previous, original, local, self.length, key_bias, renumber,
                           kwargs.get("position_ids"))
        drop.inserted = bool(most_made) or (previous is not None and previous.inserted)
        self.drops.append(drop)
        self.visual, self.question = visual, question
        self.entering = [torch.cat([entering[kept], entering.new_full((len(m),), EXTRA)])
                         for entering, kept, m in zip(self.entering, chosen, made)]
        return kept_hidden

    @staticmethod
    def _insert(local: torch.Tensor, hidden: torch.Tensor, key_bias: torch.Tensor | None, at: torch.Tensor,
                sources: torch.Tensor, padding: torch.Tensor, made: list[torch.Tensor]):
        """The shorter sequence with ``C`` slots for made tokens put in each row at ``at`` ``(B,)``.

        local: ``(B, L')`` the current column of each staying column; hidden: ``(B, L', d)`` their states;
        key_bias: ``(B, L')`` or None; sources: ``(B, C)`` the current column whose position each made slot
        takes; padding: ``(B, C)`` True on slots that only pad a row making fewer; made: per row ``(C_b, d)``.
        Returns ``(local, hidden, key_bias)`` over ``L' + C`` columns (a made slot's ``local``: its source)."""
        b, short, d = hidden.shape
        c = sources.shape[1]
        new = torch.arange(short + c, device=hidden.device).expand(b, -1)
        after = new - at[:, None]
        # (B, L' + C): where each column comes from in [the staying columns, the made slots]
        source = torch.where(after < 0, new, torch.where(after < c, short + after, new - c))
        states = torch.stack([torch.cat([m, m.new_zeros(c - len(m), d)]) for m in made]).to(hidden.dtype)
        hidden = torch.cat([hidden, states], 1).gather(1, source[..., None].expand(-1, -1, d))
        local = torch.cat([local, sources], 1).gather(1, source)
        made_bias = torch.where(padding, most_negative(hidden.dtype), 0.0).to(hidden.dtype)
        if key_bias is not None or any(len(m) < c for m in made):  # a padding slot
            key_bias = hidden.new_zeros(b, short) if key_bias is None else key_bias
            key_bias = torch.cat([key_bias, made_bias], 1).gather(1, source)
        return local, hidden, key_bias
