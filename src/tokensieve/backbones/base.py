"""What every backbone adapter shares: the sites where tokens can be reduced, and the contract
an adapter keeps (:class:`Backbone`).

A site names where a stage acts: before vision block ``i`` (``vision.i``), before the
projector (``projector``), on the LLM's input embeddings of the image (``llm.0``, the
projector's output) or before LLM decoder layer ``k`` (``llm.k``). Adapters say which sites
their model has and which signals each offers; methods say at which stages they may act and
which signals they need (``Method.signals``, ``Method.optional_signals``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tokensieve.errors import TokensieveError

STAGES = ("vision", "projector", "llm")


@dataclass(frozen=True)
class Site:
    """Where tokens can be reduced: before vision block ``layer``, before the projector, on the
    LLM's input embeddings of the image (``llm.0``: the projector's output), or before LLM decoder
    layer ``layer``. Written ``vision.3``, ``projector``, ``llm.0``, ``llm.2``."""

    stage: str
    layer: int | None = None

    @classmethod
    def parse(cls, text: str) -> Site:
        stage, _, layer = text.partition(".")
        if stage not in STAGES or (stage == "projector") != (layer == ""):
            raise TokensieveError(f"unknown site {text!r}; expected vision.<i>, projector or llm.<k>")
        try:
            return cls(stage, int(layer) if layer else None)
        except ValueError:
            raise TokensieveError(f"unknown site {text!r}: layer must be an integer") from None

    def __str__(self) -> str:
        return self.stage if self.layer is None else f"{self.stage}.{self.layer}"

    @property
    def before_llm(self) -> bool:
        """True where the image tokens are reduced before the LLM runs (the image run is rebuilt)."""
        return self.stage != "llm" or self.layer == 0

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: the order in which a forward pass reaches the sites."""
        return {"vision": 0, "projector": 1, "llm": 2}[self.stage], self.layer or 0


@runtime_checkable
class Backbone(Protocol):
    """What :func:`tokensieve.attach` needs of a model adapter (LLaVA, open_clip ViT, HF CLIP).

    The adapter alone knows the model's module paths; a request is checked against what it
    says here before any forward pass.
    """

    def sites(self) -> list[Site]:
        """Every site where a stage may act, in the order a forward pass reaches them."""

    def signals_at(self, site: Site) -> set[str]:
        """The signal names a method can read at ``site`` (docs/methods.md has the table): e.g.
        ``cls_attention`` ``(B, n)``, ``keys`` ``(B, n, d_k)``, ``text_attention`` ``(B, n)``,
        ``positions`` ``(B, n)``, ``normed_states`` ``(B, n, d)``."""

    def install(self, handle, seed: int = 0) -> None:
        """Validate ``handle.stages`` against this model (raising :class:`TokensieveError` before any
        forward pass) and register their hooks; every hook goes on ``handle.hooks`` (objects with
        ``remove()``), so ``handle.detach()`` restores the model. seed: seeds the stages' draws."""
