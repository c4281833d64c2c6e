"""What one training step of a two-stage pruner sets, and what its forward hands to the losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokensieve.errors import TokensieveError
from tokensieve.learned import MergeResult


@dataclass
class TrainingStep:
    """One training step of a :class:`tokensieve.pruner.TwoStagePruner`, from its ``set_step``.

    Set for the step: ``tau``, the Gumbel temperature of the merger and of every head;
    ``centres``, the merger's budget (None without a merger); ``head_targets``, each head's
    final cumulative keep share (:func:`tokensieve.pruner.settings.stage_targets`).
    Filled by the pruned forward that follows (each from the latest forward): ``merge``, the
    merger's :class:`MergeResult` (``logits`` ``(B, N)``, ``indices`` ``(B, M)``), and
    ``head_logits``, head i's keep/drop logits ``(B, n, 2)`` over the tokens entering it, in layer order.
    """

    step: int
    tau: float
    centres: int | None
    head_targets: list[float]
    merge: MergeResult | None = None
    head_logits: list[torch.Tensor | None] = field(default_factory=list)

    def merged(self) -> MergeResult:
        """The merger's result of the latest forward (raises before a forward has run it)."""
        if self.merge is None:
            raise TokensieveError(f"training step {self.step}: the merger has not run since set_step")
        return self.merge

    def keep_logits(self) -> list[torch.Tensor]:
        """Every head's logits of the latest forward (raises if a head has not run since set_step)."""
        missing = [i for i, logits in enumerate(self.head_logits) if logits is None]
        if missing:
            raise TokensieveError(f"training step {self.step}: pruner heads {missing} have not run since set_step")
        return list(self.head_logits)
