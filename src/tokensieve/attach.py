"""Attach reduction methods to a backbone through hooks, and detach them again.

Nothing is copied or patched: the backbone adapter registers forward pre-hooks at the named
sites and the returned :class:`Handle` removes them. ``hard`` mode removes tokens (later
layers run on fewer); ``soft`` mode keeps them but masks them as attention keys with an
additive ``log(mask)``, so a binary soft mask gives what hard removal gives on the kept tokens.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
import torch

from tokensieve.backbones.base import Backbone
from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, Method
from tokensieve.methods import create_method

MODES = ("origin", "hard", "soft")
# When the checks that read a selection's values run (they wait for the device): on each stage's
# first forward pass after attach, or on every pass (a debug switch; also TOKENSIEVE_CHECK=always).
CHECKS = ("first", "always")


@dataclass
class Stage:
    """One method acting at one site with one budget."""

    method: Method
    site: str
    budget: Budget

    def __str__(self) -> str:
        return f"{self.method.name}@{self.site}:{self.budget}"


@dataclass
class Handle:
    """What :func:`attach` returns: the attached stages, and the way back.

    detached: True once :meth:`detach` has run; the stages act only while it is False (and the
    handle is ``enabled``, and the mode is not ``origin``).
    check: ``"first"`` or ``"always"``: when each stage's selection has its values checked
    (indices sorted, unique and in range, per-row counts within the budget, an order that is a
    permutation), which waits for the device: on the stage's first forward pass after
    :func:`attach`, or on every pass (for debugging a method). Shapes are checked on every pass.
    last_counts: visual tokens before and after each stage in the latest forward pass,
    ``{str(stage): (before, after)}`` (rounded means over the rows, when a stage keeps a count
    per row).
    kept_totals: ``{str(stage): (rows, tokens)}``, the rows seen and the visual tokens kept by
    each stage summed over every forward pass since :func:`attach` (:meth:`mean_kept`).
    Both are kept as device tensors during a pass and become numbers when read, so a forward
    pass never waits for the device to count.
    scoring_seconds: time spent choosing tokens (signals + selection) since it was last reset.
    scoring_sync: called at both edges of each scoring block; a benchmark sets it to wait for
    the GPU (:func:`tokensieve.evaluate.timing.synchronizer`), whose queued kernels a host timer
    would otherwise charge to whatever waits next. The default waits for nothing.
    last_kept: the tokens each stage kept in the latest forward pass, ``{str(stage): (B, keep)}``
    indices of the image patches behind them (-1: the CLS token; -2: a slot that only pads a row
    keeping fewer; -3: a token the method made, see :class:`tokensieve.method.Selection`), for
    pictures of what was kept.
    split: how a stage's budget is split over an image's parts: ``"all"`` (one budget over all its
    visual tokens), or a rule the backbone offers (LLaVA-NeXT's anyres images at ``llm.0``:
    ``"even"``, ``"hired"``; :mod:`tokensieve.backbones.anyres_split`).
    """

    stages: list[Stage]
    mode: str
    hooks: list = field(default_factory=list)
    enabled: bool = True
    check: str = "first"
    split: str = "all"
    detached: bool = False
    scoring_seconds: float = 0.0
    scoring_sync: Callable[[], None] = field(default=lambda: None, repr=False)
    last_kept: dict = field(default_factory=dict)
    # {stage: (before, after)} and {stage: (rows, tokens)}, each count an int or a device tensor
    # until read (last_counts, kept_totals).
    _counts: dict = field(default_factory=dict, repr=False)
    _totals: dict = field(default_factory=dict, repr=False)

    def record_counts(self, stage: str, rows: int, before: int | torch.Tensor, after: int | torch.Tensor) -> None:
        """One forward pass of ``stage`` over ``rows`` rows: visual tokens per row before and after it,
        each a ``(rows,)`` tensor or an int (the same in every row). Nothing is read from the device."""
        self._counts[stage] = (before, after)
        seen, tokens = self._totals.get(stage, (0, 0))
        self._totals[stage] = (seen + rows, tokens + (after.sum() if torch.is_tensor(after) else rows * after))

    @property
    def last_counts(self) -> dict[str, tuple[int, int]]:
        """``{str(stage): (before, after)}`` of the latest pass, read from the device now (once)."""
        self._counts = {stage: tuple(_mean_count(c) for c in pair) for stage, pair in self._counts.items()}
        return dict(self._counts)

    @property
    def kept_totals(self) -> dict[str, tuple[int, int]]:
        """``{str(stage): (rows, tokens)}`` since :func:`attach`, read from the device now (once)."""
        self._totals = {stage: (rows, int(tokens)) for stage, (rows, tokens) in self._totals.items()}
        return dict(self._totals)

    @kept_totals.setter
    def kept_totals(self, totals: dict[str, tuple[int, int]]) -> None:
        self._totals = dict(totals)

    def mean_kept(self, stage: str) -> float:
        """Visual tokens ``stage`` kept per row, averaged over every row since :func:`attach`."""
        if stage not in self.kept_totals:
            raise TokensieveError(f"stage {stage} has no token counts yet: run a forward pass first")
        rows, tokens = self.kept_totals[stage]
        return tokens / rows

    def detach(self) -> None:
        """Remove every hook; the model is exactly as it was before :func:`attach`."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.detached = True

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """Charge the enclosed time to choosing tokens (``scoring_seconds``, the benchmarks'
        scoring overhead). Inside ``torch.compile`` nothing is charged: a clock read would break the
        compiled graph (``bench speed`` measures scoring in eager runs)."""
        if torch.compiler.is_compiling():
            yield
            return
        self.scoring_sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.scoring_sync()
            self.scoring_seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the unpruned model inside this block, without detaching."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @property
    def active(self) -> bool:
        # A flag rather than the hook list: torch.compile cannot trace the list's hook handles, and
        # every hook reads this (a graph break in each decoder layer).
        return self.enabled and self.mode != "origin" and not self.detached


def _mean_count(count: int | torch.Tensor) -> int:
    """A count per row ``(B,)`` as its rounded mean (an int stays as it is)."""
    return round(count.float().mean().item()) if torch.is_tensor(count) else count


def llm_depth(backbone: Backbone) -> int | None:
    """The decoder layers of ``backbone``'s LLM; None for a backbone without one (a CLIP ViT)."""
    layers = getattr(backbone, "llm_layers", None)
    return None if layers is None else len(layers)


def make_stages(method: str | dict | Method | Sequence, budget: Budget | int | float | str | None = None,
                site: str | None = None, depth: int | None = None) -> list[Stage]:
    """Stages from one method (with ``budget`` and optional ``site``) or a list of
    ``(method, site, budget)`` triples. depth: the LLM's decoder layers, for a method whose stages
    are placed by it (:meth:`Method.schedule`)."""
    if isinstance(method, (list, tuple)):
        if budget is not None or site is not None:
            raise TokensieveError("give budgets and sites inside the (method, site, budget) list")
        if not method:
            raise TokensieveError("the list of (method, site, budget) stages is empty: nothing to attach")
        for i, stage in enumerate(method):
            if not (isinstance(stage, (list, tuple)) and len(stage) == 3):
                raise TokensieveError(f"stage {i} is {stage!r}; each stage is a (method, site, budget) triple, "
                                      "e.g. ('fastv', 'llm.2', 0.25)")
        return [stage for m, s, b in method for stage in make_stages(m, b, s, depth)]
    if budget is None:
        raise TokensieveError("a budget is needed: a token count (64) or a ratio (0.25)")
    budget = Budget.parse(budget)
    m = create_method(method).for_budget(budget)
    return [Stage(m, at, b) for at, b in m.schedule(site or m.default_site, budget, depth)]


def attach(backbone: Backbone, method: str | dict | Method | Sequence,
           budget: Budget | int | float | str | None = None, site: str | None = None, mode: str = "hard",
           seed: int = 0, check: str | None = None, split: str = "all") -> Handle:
    """Attach ``method`` at ``site`` (default: the method's own) keeping ``budget`` tokens.

    ``method`` may also be a list of ``(method, site, budget)`` to reduce at several sites.
    Every stage is checked against the backbone before any forward pass (its site exists, the
    method may act there, one stage per site, the signals it needs are there, its budget fits
    the tokens the site sees), when the backbone installs it.
    Returns a :class:`Handle`; ``handle.detach()`` restores the model bit for bit.

    check: when the checks that read a selection's values run (they wait for the device):
    ``"first"`` (default), each stage's first forward pass; ``"always"``, every pass, for
    debugging a method. Unset, the environment variable ``TOKENSIEVE_CHECK`` decides (default
    ``first``). Shapes are checked on every pass.

    split: how the budget is split over an image's parts: ``"all"`` (default) one budget over all its
    visual tokens; on LLaVA-NeXT at ``llm.0`` also ``"even"`` and ``"hired"`` (the base image and each
    crop get their share, the method chooses within each; the backbone's ``splits`` lists them).
    """
    if mode not in MODES:
        raise TokensieveError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    check = check or os.environ.get("TOKENSIEVE_CHECK") or "first"
    if check not in CHECKS:
        raise TokensieveError(f"unknown check {check!r} (attach's check= or TOKENSIEVE_CHECK); expected one of "
                              f"{', '.join(CHECKS)}")
    if not isinstance(backbone, Backbone):
        raise TokensieveError(f"a {type(backbone).__name__} is not a backbone adapter: attach needs sites(), "
                              "signals_at(site) and install(handle, seed) (docs/architecture.md), e.g. "
                              "LlavaBackbone.from_pretrained(...)")
    offered = getattr(backbone, "splits", ("all",))
    if split not in offered:
        raise TokensieveError(f"split {split!r}: {getattr(backbone, 'family_name', type(backbone).__name__)} offers "
                              f"split {', '.join(offered)} (a budget split over an image's base and crops is for "
                              "anyres images: LLaVA-NeXT at llm.0)")
    stages = make_stages(method, budget, site, llm_depth(backbone))
    handle = Handle(stages, mode, check=check, split=split)
    if mode != "origin":
        backbone.install(handle, seed)
    return handle
