"""The stages of a session that chooses per image before the LLM and per row inside it: the part the
Qwen-VL session (:mod:`.qwen_pruning`) and the LLaVA-NeXT session (:mod:`.anyres_pruning`) share.

:class:`PerImageStagePlan` resolves budgets per image or row in each pass. :class:`PerImageStage`
runs the stage before the LLM: each image (or video) has its own token count and budget, and a choice
that does not depend on the other images of the batch; on an accelerator consecutive images of one kind
and count are chosen in one call, as the rows of one batch (:mod:`.call_runs`). Its selection is settled
through the session's plan, and the pass's counts and kept tokens are recorded per image
(``handle.last_kept[stage]``: one row per image, padded with ``PADDING``). A mixin: it reads the session's
``handle``, ``plan``, ``seed``, ``stage`` (the stage before the LLM) and ``site`` (its site), and calls its
``refuse_selection``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace

import torch
from torch.nn import functional as F

from tokensieve.backbones.base import Site
from tokensieve.backbones.call_runs import call_runs
from tokensieve.backbones.stage_plan import PADDING, StagePlan, row_generator
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection, SiteInputs


class PerImageStagePlan(StagePlan):
    """The stage plan of a session choosing per image (``llm.0``) and per row (``llm.k``).

    Budgets are resolved per image (``llm.0``) or per row (``llm.k``) in each pass (images and rows
    differ in token count); at attach a count before the LLM is checked against the most tokens one
    image can give (the backbone's ``most_image_tokens``); a row may hold any number of images.
    Subclasses add their family's messages and refusals.
    """

    def __init__(self, backbone, handle):
        self.depth = len(backbone.llm_layers)
        super().__init__(handle.stages, handle.mode, backbone.sites(), backbone.signals_at,
                         backbone.most_image_tokens(), False, 0, check=handle.check)

    def missing_site(self, site: Site, st) -> TokensieveError:
        if site.stage == "llm" and site.layer >= self.depth:
            return TokensieveError(f"{st}: the LLM has {self.depth} decoder layers (sites llm.0 .. "
                                   f"llm.{self.depth - 1}); llm.{site.layer} is past its depth")
        return super().missing_site(site, st)

    def refuse_made_tokens(self, site: Site, st, family: str, why_not_before: str = "") -> None:
        """Tokens a method makes, and positions renumbered after a drop, only inside the LLM (``llm.k``) in
        hard mode: soft mode keeps every token in place, and before the LLM the image runs are the model's
        (``why_not_before``: the family's words for that, and any hint, ending the refusal's line)."""
        makes, renumbers = st.method.makes_extra_tokens, getattr(st.method, "renumbers_positions", False)
        if makes and site.before_llm:
            raise TokensieveError(f"{st}: {st.method.name} adds tokens of its own, which the {family} backbone "
                                  f"places inside the LLM only (llm.k, k >= 1){why_not_before}")
        if (makes or renumbers) and self.mode == "soft":
            what = "adds tokens of its own" if makes else "renumbers positions after a drop"
            raise TokensieveError(f"{st}: {st.method.name} {what}, which soft mode cannot do (it keeps every token "
                                  "in place); use mode hard")

    def chain_budgets(self, n_patches: int, keeps_cls: bool) -> None:
        """Each stage's budget checked on its own: ``llm.0`` against the most one image gives; inside the
        LLM a row's visual tokens are known only in the pass (any number of images), so there the budget
        is resolved per row then and the method's check sees it over as many tokens as a row may hold."""
        for site, st in self.stages.items():
            if st.method.count_per_row and site.before_llm:
                raise TokensieveError(f"{st}: a count that varies per row is supported inside the LLM only (llm.k, k >= 1)")
            n = n_patches if site.before_llm else max(n_patches, st.budget.count or 0)
            keep = st.budget.resolve(n, self.budget_where(site, n))
            st.method.check(n, keep, str(site))
            self.counts[site] = (n, keep)


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


def embedded_question(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states (1, T, d), valid (1, T))``: ``model``'s input embeddings of one question's ids ``(T,)``, for
    ``SiteInputs.question_states`` before the LLM (every token real)."""
    ids = ids[None]
    return model.get_input_embeddings()(ids), torch.ones_like(ids, dtype=torch.bool)


class PerImageStage:
    """The stage before the LLM, each image chosen as if alone (mixin of a session)."""

    tokens_note = ""  # what an image's token count leaves out, in a refusal, e.g. " (newlines left out)"

    def choose_each(self, tokens: Sequence[torch.Tensor], inputs: Callable[[int], dict],
                    kinds: Sequence[str]) -> list[Selection]:
        """The stage's settled selection for every image of the pass, in order.

        tokens: per image its candidate tokens ``(N_i, d)``; inputs: image ``i``'s ``SiteInputs``
        fields beyond its tokens, budget, site and generator (``signals``, ``question_text``, ...);
        kinds: per image ``"image"`` or ``"video"``, to name it in a refusal. Each selection is a
        batch of one: indices ``(1, K_i)`` into image ``i``'s tokens.

        Each image has its own token count and budget, and its choice must not depend on the other
        images of the batch; consecutive images of one kind and count may be chosen in one call, as rows
        of one batch (:mod:`.call_runs`), which gives each what it gives alone. A method sees the images
        in prompt order.
        """
        runs = call_runs([(kind, len(image_tokens)) for kind, image_tokens in zip(kinds, tokens)], tokens[0].device)
        chosen = []
        for r, members in enumerate(runs):
            rows = torch.stack([tokens[i] for i in members])  # (G, N, d)
            fields_of = stacked_fields([inputs(i) for i in members])
            # a refusal names the first of them, which the budget refuses as it refuses them all
            sel = self._choose_one(f"{kinds[members[0]]} {members[0]}", rows, fields_of, r == len(runs) - 1)
            chosen += [row_of(sel, row) for row in range(len(members))]
        return chosen

    def image_keep(self, name: str, n: int) -> int:
        """The stage's budget for an image (named ``name`` in a refusal) of ``n`` candidate tokens."""
        st = self.stage
        if st.budget.count is not None and st.budget.count > n:
            raise TokensieveError(f"{st}: {name} gives {n} visual tokens{self.tokens_note}, fewer than the budget of "
                                  f"{st.budget.count}; give a smaller count or a ratio")
        return self.plan.keep_at(self.site, n)

    def _choose_one(self, name: str, rows: torch.Tensor, fields: dict, last: bool, keep: int | None = None
                    ) -> Selection:
        """The stage's settled selection for images (named ``name`` in a refusal) of one token count, whose
        tokens ``rows`` are ``(G, N_i, d)`` (last: the pass's last call, after which the plan stops checking
        values; keep: the budget, None for the stage's over the ``N_i`` tokens)."""
        method, (b, n), site = self.stage.method, rows.shape[:2], self.site
        keep = self.image_keep(name, n) if keep is None else keep
        with self.handle.scoring():
            sel = method.select(SiteInputs(rows, keep, str(site), lambda: row_generator(self.seed, rows), **fields))
            self.refuse_selection(sel)
            sel = self.plan.settle(site, sel, b, n, keep, pass_done=last)
            if sel.tokens is not None and sel.tokens.shape != (b, sel.indices.shape[1], rows.shape[-1]):
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


def stacked_fields(fields: list[dict]) -> dict:
    """The ``SiteInputs`` fields of several images of one token count (each a batch of one, as ``inputs``
    gives them) as one batch: signals concatenated over rows, questions padded to the longest (padding
    marked invalid), question texts and units one per row."""
    if len(fields) == 1:
        return fields[0]
    first = fields[0]
    assert set(first) <= {"signals", "units", "question_text", "question_states"}, f"cannot stack {set(first)}"
    out = {"signals": {name: (lambda name=name: torch.cat([f["signals"][name]() for f in fields]))
                       for name in first.get("signals", {})}}
    if "units" in first:
        out["units"] = [row for f in fields for row in f["units"]]
    if first.get("question_text") is not None:
        out["question_text"] = lambda: [text for f in fields for text in f["question_text"]()]
    if first.get("question_states") is not None:
        out["question_states"] = lambda: padded_questions([f["question_states"]() for f in fields])
    return out


def padded_questions(questions: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states (G, T, d), valid (G, T))`` of per-row questions ``(states (1, T_i, d), valid (1, T_i))``,
    each padded before its start to the longest ``T`` (zero states, not valid), as LLaVA-1.5's batches give
    them (the question's last token last in every row)."""
    length = max(states.shape[1] for states, _ in questions)
    return (torch.cat([F.pad(states, (0, 0, length - states.shape[1], 0)) for states, _ in questions]),
            torch.cat([F.pad(valid, (length - valid.shape[1], 0), value=False) for _, valid in questions]))


def row_of(sel: Selection, row: int) -> Selection:
    """Row ``row`` of a batch's selection, as a selection of a batch of one."""
    return replace(sel, **{f.name: value[row: row + 1] for f in fields(sel)
                           if isinstance(value := getattr(sel, f.name), torch.Tensor)})
