"""What every backbone adapter shares: the sites where tokens can be reduced.

A site names where a stage acts: before vision block ``i`` (``vision.i``), before the
projector (``projector``), on the LLM's input embeddings of the image (``llm.0``, the
projector's output) or before LLM decoder layer ``k`` (``llm.k``). Adapters say which sites
their model has; methods say at which stages they may act.
"""

from __future__ import annotations

from dataclasses import dataclass

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
