"""The stage plan every pruning session shares, whatever the backbone: which stages a request
may hold, which tokens each stage may keep, in what order the stages see them, and how a
selection is checked and counted.

A session (LLaVA's, a CLIP ViT's) builds a :class:`StagePlan` when it is installed (so a bad
request is refused before any forward pass), seeds each row with :func:`row_generator`, settles
what a method returns with :meth:`StagePlan.settle` (:func:`check_selection`), records counts with
:meth:`StagePlan.record`, and marks the patch index it records for slots that are not image
patches with :data:`PADDING` and :data:`EXTRA`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import replace

import torch

from tokensieve.backbones.base import Site
from tokensieve.errors import TokensieveError
from tokensieve.method import Selection

# Patch index recorded in handle.last_kept for a slot that only pads a row keeping fewer tokens,
# and for a token a method made itself (Selection.extra).
PADDING = -2
EXTRA = -3


def row_generator(seed: int, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Generator]:
    """One generator per row, seeded by ``seed`` and the row's own content, so a sample draws
    the same whether it is alone or in a batch. tokens: ``(B, N, d)``; valid: optional ``(B, N)``,
    False for slots that only pad a row (left out of its seed).

    Built only for a method that draws (:meth:`~tokensieve.method.SiteInputs.generators`): seeding
    from content reads it back from the device, once for the batch (the 4 features a seed reads).
    """
    gens = []
    valid = None if valid is None else valid.cpu()
    for r, row in enumerate(tokens.detach()[..., :4].float().cpu()):
        row = row if valid is None else row[valid[r]]
        digest = zlib.crc32(row.mul(100).round().to(torch.int64).numpy().tobytes())
        gens.append(torch.Generator().manual_seed(seed * 1_000_003 + digest))
    return gens


def check_selection(sel: Selection, batch: int, n: int, keep: int, where: str, per_row: bool = False,
                    values: bool = True) -> None:
    """Budgets met exactly, or at most per row where ``per_row`` allows a count per row (``valid``,
    ``extra_valid``); indices sorted, unique and in range. Extra tokens count toward the budget.

    Shapes and dtypes (host metadata) are always checked; what needs the tensors' values (order,
    range, per-row totals, ``order`` a permutation) only with ``values``, since reading them waits
    for the device.
    """
    idx, made = sel.indices, 0
    if sel.extra is not None:
        if sel.extra.dim() != 3 or sel.extra.shape[0] != batch:
            raise TokensieveError(f"{where}: extra tokens must be shaped (B, E, d) with B={batch}, "
                                  f"got {tuple(sel.extra.shape)}")
        made = sel.extra.shape[1]
        if sel.extra_valid is not None and (sel.extra_valid.shape != sel.extra.shape[:2]
                                            or sel.extra_valid.dtype != torch.bool):
            raise TokensieveError(f"{where}: extra_valid must be a bool tensor shaped like the extra tokens' "
                                  f"first two axes {tuple(sel.extra.shape[:2])}")
        if sel.extra_at is not None and (sel.extra_at.shape != sel.extra.shape[:2] or sel.extra_at.dtype != torch.long):
            raise TokensieveError(f"{where}: extra_at must be a long tensor shaped like the extra tokens' first two "
                                  f"axes {tuple(sel.extra.shape[:2])}")
    counted = sel.valid is not None or sel.extra_valid is not None
    if counted and not per_row:
        raise TokensieveError(f"{where}: a count that varies per row is supported inside the LLM only (llm.k)")
    if not counted and idx.shape != (batch, keep - made):
        raise TokensieveError(f"{where}: a method returned indices of shape {tuple(idx.shape)}, "
                              f"expected {(batch, keep - made)}")
    if counted:
        if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] > n:
            raise TokensieveError(f"{where}: a method returned indices of shape {tuple(idx.shape)}, "
                                  f"expected ({batch}, at most {n})")
        if sel.valid is not None and (sel.valid.shape != idx.shape or sel.valid.dtype != torch.bool):
            raise TokensieveError(f"{where}: valid must be a bool tensor shaped like the indices {tuple(idx.shape)}")
    order_error = f"{where}: order must be a permutation of the {idx.shape[1]} kept slots in each row"
    if sel.order is not None and sel.order.shape != idx.shape:
        raise TokensieveError(order_error)
    if not values:
        return
    if counted:
        kept = sel.valid.sum(1) if sel.valid is not None else idx.shape[1]
        total = kept + (sel.extra_valid.sum(1) if sel.extra_valid is not None else made)
        if not bool((total >= 1).all()):
            raise TokensieveError(f"{where}: every row must keep at least one token")
        if bool((total > keep).any()):
            raise TokensieveError(f"{where}: a row keeps {int(total.max())} tokens, more than the budget of {keep}")
    if sel.order is not None and not torch.equal(
            sel.order.sort(1).values, torch.arange(idx.shape[1], device=idx.device).expand_as(idx)):
        raise TokensieveError(order_error)
    if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise TokensieveError(f"{where}: kept indices must be sorted and unique")
    if bool((idx < 0).any()) or bool((idx >= n).any()):
        raise TokensieveError(f"{where}: kept indices out of range 0..{n - 1}")
    if sel.extra_at is not None and (bool((sel.extra_at < 0).any()) or bool((sel.extra_at >= n).any())):
        raise TokensieveError(f"{where}: extra_at out of range 0..{n - 1}")


def merges_in_blocks(method) -> bool:
    """True for a method the engine runs inside the tower's blocks (ToMe) instead of at its site."""
    return bool(getattr(method, "merges_in_blocks", False))


def tokens_entering_merges(method, n: int, keep: int, first: int, end: int) -> dict[int, int]:
    """``{block: patch tokens entering it}`` for blocks ``first + 1 .. end`` while an in-block method
    (ToMe) merges ``n`` tokens down to ``keep`` in blocks ``first .. end - 1``: each block runs on what
    the blocks before it left."""
    entering, left = {}, n
    for block, r in zip(range(first, end), method.merge_schedule(n, keep, end - first)):
        left -= r
        entering[block + 1] = left
    return entering


def stage_inputs(stages: dict, n_patches: int, keeps_cls: bool):
    """Yield ``(site, stage, n)`` in the order a forward pass reaches the sites, ``n`` the visual
    tokens the stage sees: the patches in the tower and before the LLM, plus CLS inside it when
    the LLM receives CLS. A stage keeping a count per row is followed as if it kept its budget.

    stages: ``{Site: Stage}``.
    """
    n, in_llm = n_patches, False
    for site in sorted(stages, key=lambda s: s.order):
        if not site.before_llm and not in_llm:
            n, in_llm = n + int(keeps_cls), True  # CLS is an ordinary image token in the LLM
        stage = stages[site]
        yield site, stage, n
        n = stage.method.kept_count(n, stage.budget.resolve(n, str(site)))


def check_signals(stages: dict, signals_at: Callable[[Site], set[str]]) -> None:
    """Every signal a stage's method needs exists at its site (``signals_at``: the backbone's
    :meth:`~tokensieve.backbones.base.Backbone.signals_at`); in-block methods read their blocks' own keys."""
    for site, st in stages.items():
        missing = sorted(set(st.method.signals) - signals_at(site))
        if missing and not merges_in_blocks(st.method):
            have = ", ".join(sorted(signals_at(site))) or "none"
            raise TokensieveError(f"{st}: {st.method.name} needs {', '.join(missing)}, which {site} does not "
                                  f"provide (it provides: {have})")


# Signals computed from a tower block's attention input: they describe the tokens that block saw.
TOWER_ATTENTION_SIGNALS = frozenset({"cls_attention", "keys", "attention", "last_block_cls_attention",
                                     "last_block_keys"})


class StagePlan:
    """The stages of one handle on one backbone, checked, with their budgets chained.

    Built when a session is installed, before any model work. A backbone's plan says in a few
    methods what differs in its messages (:meth:`missing_site`, :meth:`place`, :meth:`budget_where`,
    :meth:`merge_span`), what more it refuses (:meth:`check_stage`), and, where a site's token count
    is known only in the pass (Qwen-VL's images of any size), how budgets are checked at attach
    (:meth:`chain_budgets`).

    stages: ``{Site: Stage}`` in the order given. counts: ``{Site: (tokens the site sees, budget)}``
    (a stage after one keeping a count per row is followed as if that one kept its budget).
    schedules: ``{Site: {block: tokens merged there}}`` for in-block stages (ToMe), which merge in
    blocks ``i`` up to the next vision stage or ``tower_end``. capped: sites whose budget caps a
    count that varies per row. check: ``"first"`` or ``"always"`` (the handle's): whether
    :meth:`settle` checks a selection's values on a stage's first pass only or on every pass;
    checked: the sites whose values were checked. takes_video: whether the backbone's prompts may hold
    videos (a method that ``needs_video`` is refused at attach where they may not).
    """

    takes_video = False

    def __init__(self, stages: list, mode: str, sites: list[Site], signals_at: Callable[[Site], set[str]],
                 n_patches: int, keeps_cls: bool, tower_end: int, check: str = "first"):
        self.mode, self.sites, self.tower_end, self.check = mode, sites, tower_end, check
        self.checked: set[Site] = set()
        self.stages: dict = {}
        for st in stages:
            site = Site.parse(st.site)
            in_blocks = merges_in_blocks(st.method) and site == Site("vision", 0) and any(
                s.stage == "vision" for s in sites)  # an in-block stage may merge from a tower's first block on
            if site not in sites and not in_blocks:
                raise self.missing_site(site, st)
            if site.stage not in st.method.stages:
                raise TokensieveError(f"method {st.method.name!r} cannot act {self.place(site)} "
                                      f"(it acts at: {', '.join(st.method.stages)})")
            self.check_stage(site, st)
            if st.method.needs_video and not self.takes_video:
                raise TokensieveError(f"{st}: {st.method.name} prunes videos only (its rule compares a video's frames), "
                                      "and this model takes images only (videos: LLaVA-OneVision, Qwen-VL)")
            if site in self.stages:
                raise TokensieveError(f"two stages at site {site}")
            self.stages[site] = st
        check_signals(self.stages, signals_at)
        self.counts: dict = {}
        self.schedules: dict = {}
        self.capped: set = set()
        self.chain_budgets(n_patches, keeps_cls)
        self._check_merged_signals()

    # --- what a backbone's plan words or refuses its own way -----------------------------
    def missing_site(self, site: Site, st) -> TokensieveError:
        """The error for a stage at a site this model does not have."""
        return TokensieveError(f"site {site} does not exist here; sites are {', '.join(map(str, self.sites))}")

    def place(self, site: Site) -> str:
        """Where a method that cannot act at ``site`` was asked to act, as words."""
        return f"at {site}"

    def check_stage(self, site: Site, st) -> None:
        """Raise for a stage this backbone cannot run at ``site`` in this mode (nothing by default)."""

    def budget_where(self, site: Site, n: int) -> str:
        """How a budget's error names ``site``, where it sees ``n`` tokens."""
        return str(site)

    def signal_block(self, site: Site, signal: str) -> int:
        """The tower block whose attention gives ``signal`` to a stage at ``site`` (before the LLM):
        the block before a vision site, else the feature block."""
        return site.layer - 1 if site.stage == "vision" else self.tower_end - 1

    def varies_per_row(self, site: Site) -> bool:
        """Whether a selection at ``site`` may keep a count that varies per row (``Selection.valid``):
        inside the LLM; before it where each row is one image chosen alone (LLaVA-NeXT's ``llm.0``)."""
        return not site.before_llm

    def merge_span(self, site: Site, end: int) -> str:
        """How an in-block stage's error names the blocks it merges in."""
        return f"{site.layer}..{end - 1}"

    # --- the budget chain ---------------------------------------------------------------
    def chain_budgets(self, n_patches: int, keeps_cls: bool) -> None:
        """Resolve every budget against the tokens its site will see.

        After a stage that keeps a count per row a later budget is a cap: a token count (each
        row keeps at most that many) or 1.0; a ratio of a row's tokens would make a row's result
        depend on the batch it is in.
        """
        per_row = None
        for site, st, n in stage_inputs(self.stages, n_patches, keeps_cls):
            if st.method.count_per_row and site.before_llm:
                raise TokensieveError(f"{st}: a count that varies per row is supported inside the LLM only (llm.k, k >= 1)")
            if per_row is not None:
                if st.budget.ratio is not None and st.budget.ratio < 1:
                    raise TokensieveError(f"{st} follows {per_row}, which keeps a count per row: give it a token "
                                          "count (the most a row keeps) or 1.0, not a ratio")
                self.capped.add(site)
            keep = st.budget.resolve(n, self.budget_where(site, n))
            st.method.check(n, keep, str(site))
            if st.method.count_per_row:
                per_row = per_row or st
            if merges_in_blocks(st.method):
                self._plan_merges(site, st, n, keep)
            self.counts[site] = (n, keep)

    def _plan_merges(self, site: Site, st, n: int, keep: int) -> None:
        """An in-block stage at ``vision.i`` merges in blocks ``i`` up to the next vision stage or
        ``tower_end``, ``r`` tokens each as its ``merge_schedule`` says."""
        later = [s.layer for s in self.stages if s.stage == "vision" and s.layer > site.layer]
        end = min(later, default=self.tower_end)
        try:
            r = st.method.merge_schedule(n, keep, end - site.layer)
        except TokensieveError as e:
            raise TokensieveError(f"{st} merges in blocks {self.merge_span(site, end)}: {e}") from None
        self.schedules[site] = {site.layer + i: r_i for i, r_i in enumerate(r)}

    def _check_merged_signals(self) -> None:
        """Refuse a stage reading a block's attention when an in-block stage merges inside that block:
        the attention ran before the merge, so it would describe tokens that are gone."""
        merging = {block: st for site, st in self.stages.items() if site in self.schedules
                   for block, r in self.schedules[site].items() if r}
        for site, st in self.stages.items():
            if site in self.schedules or not site.before_llm:
                continue
            for signal in sorted((set(st.method.signals) | set(st.method.optional_signals)) & TOWER_ATTENTION_SIGNALS):
                block = self.signal_block(site, signal)
                if block in merging:
                    raise TokensieveError(f"{st}: {signal} comes from block {block}'s attention, which runs before "
                                          f"{merging[block]} merges inside block {block}, so it would describe tokens "
                                          "that are gone; a stage reading tower attention cannot follow one merging "
                                          "in that block")

    # --- one forward pass ---------------------------------------------------------------
    def keep_at(self, site: Site, n: int) -> int:
        """The budget of the stage at ``site`` over the ``n`` tokens it sees now (a cap after a
        count per row)."""
        budget = self.stages[site].budget
        return min(budget.count, n) if site in self.capped and budget.count else budget.resolve(n, str(site))

    def settle(self, site: Site, sel: Selection, batch: int, n: int, keep: int,
               valid: torch.Tensor | None = None, pass_done: bool = True) -> Selection:
        """``sel`` checked (:func:`check_selection`, a count per row inside the LLM only; its values on the
        stage's first pass, or every pass with ``check="always"``), with the padding of the ``(B, n)``
        ``valid`` it kept marked in its ``valid`` (None when every slot is real). pass_done: False while
        more selections of this stage's pass follow (a session choosing image by image), so each is checked."""
        st = self.stages[site]
        values = self.check == "always" or site not in self.checked
        check_selection(sel, batch, n, st.method.kept_count(n, keep), f"{st.method.name} at {site}",
                        per_row=self.varies_per_row(site), values=values)
        if pass_done:
            self.checked.add(site)
        if valid is not None:
            still = valid.gather(1, sel.indices)
            sel = replace(sel, valid=still if sel.valid is None else sel.valid & still)
        if sel.valid is not None and bool(sel.valid.all()):
            sel = replace(sel, valid=None)
        return sel

    def record(self, handle, site: Site, sel: Selection, n: int, valid: torch.Tensor | None = None) -> None:
        """``handle.record_counts`` of a settled selection over ``n`` tokens (``valid``: ``(B, n)`` as given
        to :meth:`settle`): the real tokens per row before, the kept and made ones after."""
        before = valid.sum(1) if valid is not None else n
        kept = sel.valid.sum(1) if sel.valid is not None else sel.indices.shape[1]
        made = sel.extra_valid.sum(1) if sel.extra_valid is not None else (
            0 if sel.extra is None else sel.extra.shape[1])
        handle.record_counts(str(self.stages[site]), sel.indices.shape[0], before, kept + made)

    def record_merged(self, handle, site: Site, batch: int, kept: torch.Tensor) -> None:
        """An in-block stage's counts (planned: every row merges to the budget) and ``kept`` ``(B, keep)``,
        the patches behind the tokens it left, in ``handle.last_kept``."""
        n, keep = self.counts[site]
        stage = str(self.stages[site])
        handle.record_counts(stage, batch, n, keep)
        handle.last_kept[stage] = kept
