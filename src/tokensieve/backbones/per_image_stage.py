"""The stage before the LLM chosen one image at a time: the part the Qwen-VL session
(:mod:`.qwen_pruning`) and the LLaVA-NeXT session (:mod:`.anyres_pruning`) share.

Each image (or video) is a batch of one: its own token count and budget, and a choice that does
not depend on the other images of the batch. Its selection is settled through the session's plan,
and the pass's counts and kept tokens are recorded per image (``handle.last_kept[stage]``: one row
per image, padded with ``PADDING``). A mixin: it reads the session's ``handle``, ``plan``, ``seed``,
``stage`` (the stage before the LLM) and ``site`` (its site), and calls its ``refuse_selection``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tokensieve.backbones.stage_plan import PADDING, row_generator
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection, SiteInputs


def per_image_questions(questions: Callable[[], list[str]] | None
                        ) -> Callable[[int], Callable[[], list[str]] | None]:
    """Per image ``i`` a function giving its question as text (a list of one), for
    ``SiteInputs.question_text``; every question is decoded once, when a method first asks.
    questions: a function giving each image's question; None (no processor to decode with) gives None."""
    texts: list[str] = []

    def of(i: int) -> Callable[[], list[str]] | None:
        def question_text() -> list[str]:
            if not texts:
                texts.extend(questions())
            return [texts[i]]
        return None if questions is None else question_text
    return of


class PerImageStage:
    """The stage before the LLM, run on each image alone (mixin of a session)."""

    tokens_note = ""  # what an image's token count leaves out, in a refusal, e.g. " (newlines left out)"

    def choose_each(self, tokens: Sequence[torch.Tensor], inputs: Callable[[int], dict],
                    kinds: Sequence[str]) -> list[Selection]:
        """The stage's settled selection for every image of the pass, in order.

        tokens: per image its candidate tokens ``(N_i, d)``; inputs: image ``i``'s ``SiteInputs``
        fields beyond its tokens, budget, site and generator (``signals``, ``question_text``, ...);
        kinds: per image ``"image"`` or ``"video"``, to name it in a refusal. Each selection is a
        batch of one: indices ``(1, K_i)`` into image ``i``'s tokens.
        """
        chosen = []
        # One image at a time: each has its own token count and budget, and its choice must not depend
        # on the other images of the batch. Images of equal count could go as one batch (a speed-up).
        for i, image_tokens in enumerate(tokens):
            fields = inputs(i)
            chosen.append(self._choose_one(f"{kinds[i]} {i}", image_tokens[None], fields, i == len(tokens) - 1))
        return chosen

    def _choose_one(self, name: str, rows: torch.Tensor, fields: dict, last: bool) -> Selection:
        """The stage's settled selection for one image (named ``name`` in a refusal), whose tokens
        ``rows`` are ``(1, N_i, d)`` (last: the pass's last image, after which the plan stops checking values)."""
        st, method, n, site = self.stage, self.stage.method, rows.shape[1], self.site
        if st.budget.count is not None and st.budget.count > n:
            raise TokensieveError(f"{st}: {name} gives {n} visual tokens{self.tokens_note}, fewer than the budget of "
                                  f"{st.budget.count}; give a smaller count or a ratio")
        keep = self.plan.keep_at(site, n)
        with self.handle.scoring():
            sel = method.select(SiteInputs(rows, keep, str(site), lambda: row_generator(self.seed, rows), **fields))
            self.refuse_selection(sel)
            sel = self.plan.settle(site, sel, 1, n, keep, pass_done=last)
            if sel.tokens is not None and sel.tokens.shape != (1, sel.indices.shape[1], rows.shape[-1]):
                raise TokensieveError(f"{method.name} at {site}: merged tokens of shape {tuple(sel.tokens.shape)} "
                                      f"for kept indices of shape {tuple(sel.indices.shape)}")
        return sel

    def record_images(self, kept: list[torch.Tensor], counts: list[int]) -> None:
        """Counts per image (``handle.last_counts``: means over the images) and ``handle.last_kept[stage]``:
        ``(n_images, K_max)`` long, image ``i``'s kept tokens ``kept[i]`` (as the session numbers them),
        then ``PADDING`` (-2) where it keeps fewer than ``K_max`` (a count budget keeps the same in every
        image; a ratio may not). counts: per image its candidate tokens."""
        device = kept[0].device
        padded = torch.full((len(kept), max(len(k) for k in kept)), PADDING, dtype=torch.long, device=device)
        for i, k in enumerate(kept):
            padded[i, : len(k)] = k
        real = torch.arange(max(counts), device=device) < torch.tensor(counts, device=device)[:, None]
        self.plan.record(self.handle, self.site, Selection(padded.clamp(min=0), valid=padded >= 0), max(counts), real)
        self.handle.last_kept[str(self.stage)] = padded
