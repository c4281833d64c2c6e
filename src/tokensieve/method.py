"""Token-reduction methods: the base class, budgets, what a method sees, and ``register``.

A method looks at the visual tokens at one site and says which of them stay (sorted,
unique indices) and, if it merges, what the kept slots now hold. It never touches a model:
the backbone adapter hands it the tokens and any signal it asks for (CLS attention, the
last text token's attention, attention keys), and applies its choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tokensieve.errors import TokensieveError


@dataclass(frozen=True)
class Budget:
    """How many visual tokens stay at a site: an exact ``count`` or a ``ratio`` of those there."""

    count: int | None = None
    ratio: float | None = None
    rounding: str = "nearest"  # of a ratio's count: "nearest", or "down" as a paper's int() does

    def __post_init__(self):
        if (self.count is None) == (self.ratio is None):
            raise TokensieveError("a budget is either a token count or a ratio, not both or neither")
        if self.count is not None and (isinstance(self.count, bool) or self.count < 1):
            raise TokensieveError(f"budget {self.count}: keep at least one token")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise TokensieveError(f"budget ratio {self.ratio} is not in (0, 1]")
        if self.rounding not in ("nearest", "down"):
            raise TokensieveError(f"budget rounding {self.rounding!r} is not 'nearest' or 'down'")

    @classmethod
    def parse(cls, value: Budget | int | float | str) -> Budget:
        """``64`` or ``"64"`` keeps 64 tokens; ``0.25``, ``"0.25"`` or ``"25%"`` keeps a quarter."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    return cls(ratio=float(text[:-1]) / 100)
                return cls(count=int(text)) if text.isdigit() else cls(ratio=float(text))
            except ValueError:
                raise TokensieveError(f"cannot read budget {value!r}; write a count (64) or a ratio (0.25, 25%)") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(count=value)
        if isinstance(value, float):
            return cls(ratio=value)
        raise TokensieveError(f"cannot read budget {value!r}; write a count (64) or a ratio (0.25, 25%)")

    def resolve(self, available: int, where: str = "this site") -> int:
        """The exact number of tokens to keep out of ``available``."""
        if self.count is not None:
            if self.count > available:
                raise TokensieveError(f"budget of {self.count} tokens is larger than the {available} "
                                      f"visual tokens at {where}")
            return self.count
        exact = self.ratio * available
        return max(1, int(exact) if self.rounding == "down" else round(exact))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{self.ratio:g}" if self.ratio < 1 else "1.0"  # not "1", which reads as one token


# Signals not laid out over the N tokens on their second axis (checked on the batch axis only):
# one value per row (CLS), the image run as the LLM received it, (B, T, N) from the T tokens
# after the image, or (B, n_crops, P) per crop of an anyres image (LLaVA-NeXT).
ROW_SIGNALS = frozenset({"cls_token", "input_image_embeddings", "post_image_attention", "crop_cls_attention",
                         "first_block_crop_cls_attention"})


@dataclass(frozen=True)
class VisualUnit:
    """One image or video among a row's visual tokens: its grid of ``frames x rows x cols`` tokens as the
    site sees them (an image: one frame; a Qwen-VL video: its temporal patches, two frames each, of merged
    2x2 patches), and which cells of it the row holds: ``cells`` ``(n,)`` increasing flat indices
    ``(f * rows + r) * cols + c``, the row's tokens ``start .. start + n`` (all cells unless an earlier
    stage dropped some)."""

    kind: str  # "image" or "video"
    frames: int
    rows: int
    cols: int
    start: int
    cells: torch.Tensor


@dataclass
class SiteInputs:
    """What a method sees at a site, for one batch.

    tokens: ``(B, N, d)`` the visual tokens that may be removed (prefix tokens such as CLS are
        excluded and always kept).
    keep: how many of the ``N`` must stay, per row.
    site: where this is, e.g. ``"vision.2"``, ``"projector"``, ``"llm.2"``.
    generator: one seeded generator per row (same draws for a sample alone or in a batch), or a
        function making them (so methods that never draw never pay for seeding); read it
        through :meth:`generators`.
    signals: name -> function computing it; asked for through :meth:`signal`.
    question_states: function giving the question tokens as the site sees them, read through
        :meth:`question`.
    question_signals: name -> function computing a signal over the question tokens, aligned with
        :meth:`question` (``(B, T, ...)``); asked for through :meth:`question_signal`.
    question_text: function giving each row's question as text, read through :meth:`question_texts`.
    valid: optional ``(B, N)`` bool, False for tokens that only pad a row: an earlier stage kept
        fewer tokens in that row than in others (see :class:`Selection`). A method should not
        keep them; any it keeps stay padding (the row then keeps fewer than ``keep``).
    units: optional, per row its :class:`VisualUnit` s in token order (images and videos with their
        grids), where the backbone has several per row or videos (Qwen-VL); None where each row is the
        one image grid the backbone has (LLaVA, CLIP).
    """

    tokens: torch.Tensor
    keep: int
    site: str
    generator: list[torch.Generator] | Callable[[], list[torch.Generator]]
    signals: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    question_states: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    valid: torch.Tensor | None = None
    question_signals: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    question_text: Callable[[], list[str]] | None = None
    units: list[list[VisualUnit]] | None = None

    def __post_init__(self):
        n = self.tokens.shape[1]
        if not 1 <= self.keep <= n:
            raise TokensieveError(f"cannot keep {self.keep} of the {n} tokens at {self.site}")

    def generators(self) -> list[torch.Generator]:
        if callable(self.generator):
            self.generator = self.generator()
        return self.generator

    def signal(self, name: str) -> torch.Tensor:
        """A signal at this site (``docs/methods.md`` lists them): over the ``N`` tokens, e.g.
        ``cls_attention`` ``(B, N)``, ``keys`` ``(B, N, d_k)``, ``text_attention`` ``(B, N)``; or one
        per row, e.g. ``cls_token`` ``(B, d)``."""
        if name not in self.signals:
            have = ", ".join(sorted(self.signals)) or "none"
            raise TokensieveError(f"signal {name!r} is not available at {self.site} (available: {have})")
        value = self.signals[name]()
        expected = self.tokens.shape[:1] if name in ROW_SIGNALS else self.tokens.shape[:2]
        if tuple(value.shape[:len(expected)]) != tuple(expected):
            raise TokensieveError(f"signal {name!r} has shape {tuple(value.shape)}; it must start with "
                                  f"{tuple(expected)} like the tokens at {self.site}")
        return value

    def question_signal(self, name: str) -> torch.Tensor:
        """A signal over the question tokens, ``(B, T, ...)`` aligned with :meth:`question`, e.g.
        ``prev_layer_keys`` ``(B, T, d_k)``."""
        if name not in self.question_signals:
            have = ", ".join(sorted(self.question_signals)) or "none"
            raise TokensieveError(f"question signal {name!r} is not available at {self.site} (available: {have})")
        return self.question_signals[name]()

    def question_texts(self) -> list[str]:
        """Each row's question as text (what a text encoder such as CLIP's reads)."""
        if self.question_text is None:
            raise TokensieveError(f"the question text is not available at {self.site}: run the model through "
                                  "the backbone's forward or generate, with a processor")
        return self.question_text()

    def question(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states (B, T, d), valid (B, T) bool)``: the question tokens of each row (its
        embeddings before the LLM, its hidden states at an LLM layer), padded on the left."""
        if self.question_states is None:
            raise TokensieveError(f"the question is not available at {self.site}: run the model through "
                                  "the backbone's forward or generate")
        return self.question_states()


@dataclass
class Selection:
    """A method's decision for a batch.

    indices: ``(B, K)`` sorted, unique indices into the ``N`` tokens that stay (``K = keep - E``
        when the method makes ``E`` extra tokens).
    tokens: optional ``(B, K, d)`` new contents of those slots (merging methods); ``None``
        means the kept tokens are unchanged.
    key_mask: optional ``(B, K)`` keep weights in [0, 1] of the kept tokens as attention keys
        in every later LLM layer, used in ``soft`` mode only and at the projector or inside the
        LLM (not in the vision tower): a differentiable (e.g. straight-through Gumbel) mask that
        a trained method learns through. ``None`` means every kept token counts fully.
    valid: optional ``(B, K)`` bool for a count that varies per row, inside the LLM only: False
        marks slots that only pad a row keeping fewer than ``K`` (every row needs at least one
        True). In ``hard`` mode the padding stays in the shorter sequence, masked as an attention
        key in every later layer, so a batch gives what each row gives alone; in ``soft`` mode it
        is dropped like the rest. ``K`` may then be below the budget, which is the most a row
        keeps. ``None`` means every slot is kept (every row keeps exactly the budget).
    extra: optional ``(B, E, d)`` tokens the method makes that are not among the ``N`` (VisionZip's
        CLS state, PruMerge's summary of the pruned tokens). They count toward the budget and enter the
        image run before the kept tokens (``extra_first``) or after them; before the LLM (``projector``,
        ``llm.0``), or inside it (SparseVLM's recycled tokens: positions renumbered, or each taking a token's
        position, ``extra_at``), in ``hard`` mode, by methods with ``makes_extra_tokens``.
    extra_valid: optional ``(B, E)`` bool, inside the LLM: False marks extra slots that only pad a row
        making fewer (as ``valid`` does for kept slots).
    extra_at: optional ``(B, E)`` indices into the ``N`` tokens, inside the LLM: the token whose position
        (its RoPE rotation; on Qwen-VL its 3-D M-RoPE ids) each extra token takes, for a method that keeps
        positions (SparseVLM's ``positions="original"``: its cluster's centre). Needed there; ignored
        where positions are renumbered (an extra token then takes its place in the order).
    order: optional ``(B, K)`` permutation of the kept slots: the order in which they enter the image
        run (``indices[order]``), for a paper whose code emits them in another order than the image's
        (VisionZip: dominant tokens, then contextual ones); only before the LLM, in ``hard`` mode.
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    extra_first: bool = False
    extra_valid: torch.Tensor | None = None
    extra_at: torch.Tensor | None = None
    order: torch.Tensor | None = None


class Method:
    """Base of every reduction method. Subclasses are dataclasses of their parameters.

    Class attributes: ``name`` (registry key), ``paper`` (citation), ``stages`` (where it may
    act: any of ``vision``, ``projector``, ``llm``), ``default_site``, ``signals`` (what it
    asks the backbone for), ``trained`` (its weights come from ``tokensieve train``) and
    ``makes_extra_tokens`` (its selections may add tokens of its own, :class:`Selection`); an
    instance may also decide the last from its parameters (a property). ``optional_signals`` are
    read where a site offers them and done without elsewhere. ``handles_video``: it may be given a
    video's tokens (frames of a grid, :attr:`SiteInputs.units`); a video given to a method without it
    is refused in the pass. ``needs_video``: it prunes videos only (its rule compares a video's frames);
    it is refused when attaching to a backbone that takes no video, and an image is refused in the pass.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ("vision", "projector", "llm")
    default_site: ClassVar[str] = "projector"
    signals: ClassVar[tuple[str, ...]] = ()
    optional_signals: ClassVar[tuple[str, ...]] = ()  # used where a site offers them
    trained: ClassVar[bool] = False  # True for methods whose weights come from training (tokensieve train)
    makes_extra_tokens: ClassVar[bool] = False  # True if select() may return Selection.extra
    budget_is_share: ClassVar[bool] = False  # True if its budget is a share of each stage's tokens, not a count
    handles_video: ClassVar[bool] = False  # True if its rule holds for a video's tokens (no single 2-D grid assumed)
    needs_video: ClassVar[bool] = False  # True if its rule holds for a video's tokens only (DyCoke)

    def select(self, inputs: SiteInputs) -> Selection:
        """Choose ``inputs.keep`` of the ``N`` tokens of every row."""
        raise NotImplementedError

    @property
    def count_per_row(self) -> bool:
        """True when the rows of a batch may keep different counts (``select`` gives
        ``Selection.valid``); such a method acts inside the LLM only."""
        return False

    def for_budget(self, budget: Budget) -> Method:
        """The method as configured for ``budget``: itself, or, for a paper whose budgets name settings
        of its parameters (SparseVLM's 192 / 128 / 64 choose its scale and bias), a copy so set."""
        return self

    def schedule(self, site: str, budget: Budget, depth: int | None = None) -> list[tuple[str, Budget]]:
        """The ``(site, budget)`` stages this method runs as when attached at ``site`` with
        ``budget``: one by default; several for a method that reduces at several layers in turn
        (PyramidDrop), each with the budget of the tokens its site sees. depth: the LLM's decoder
        layers (None where there is no LLM)."""
        return [(site, budget)]

    def kept_count(self, available: int, keep: int) -> int:
        """How many of ``available`` tokens the method keeps with a budget of ``keep``: ``keep``,
        or fewer for a rule that rounds its quota down (DART's tokens per pivot)."""
        return keep

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        """Raise :class:`TokensieveError` if keeping ``keep`` of ``n_tokens`` at ``site`` cannot
        work with this method's parameters. Called when attaching, before any model work."""

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **parameters}``: enough to :func:`create_method` it again. Fields marked
        ``metadata={"state": True}`` (trained modules, the last forward's outputs) are not parameters."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                      if not f.metadata.get("state")}}


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass of its parameters")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    """Every method registered so far, by name (the built-in ones once :mod:`tokensieve.methods` is imported)."""
    return dict(_REGISTRY)
