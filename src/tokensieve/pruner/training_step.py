"""What one training step of a two-stage pruner sets, and what its forward hands to the losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokensieve.errors import TokensieveError
from tokensieve.learned import MergeResult
from tokensieve.method import Budget


@dataclass
class TrainingStep:
    """One training step of a :class:`tokensieve.pruner.TwoStagePruner`, from its ``set_step``.

    Set for the step: ``tau``, the Gumbel temperature of the merger and of every head;
    ``centres``, the merger's budget (a count, a per-image ratio :class:`Budget`, or None without a
    merger); ``head_targets``, each head's final cumulative keep share
    (:func:`tokensieve.pruner.settings.stage_targets`).
    Filled by the one pruned forward that follows, a call of a method at a time: ``merges``, the
    merger's :class:`MergeResult` of each call (``logits`` ``(b, N)``, ``indices`` ``(b, M)``: the whole
    batch at once on LLaVA, one image per call on Qwen-VL), and ``head_logits``, per head in layer
    order its keep/drop logits ``(b, n, 2)`` of each call (the batch, or one row per call where rows
    have their own token counts).
    """

    step: int
    tau: float
    centres: int | Budget | None
    head_targets: list[float]
    merges: list[MergeResult] = field(default_factory=list)
    head_logits: list[list[torch.Tensor]] = field(default_factory=list)

    def merged(self) -> list[MergeResult]:
        """The merger's results of the forward (raises before a forward has run it)."""
        if not self.merges:
            raise TokensieveError(f"training step {self.step}: the merger has not run since set_step")
        return self.merges

    def keep_logits(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per head, its logits over the forward's ``rows`` rows ``(rows, n_max, 2)`` (a row with fewer
        tokens padded with zeros) and ``(rows, n_max)`` bool, True on real tokens. Raises if a head has
        not run since set_step, or ran over other than ``rows`` rows (more than one forward)."""
        missing = [i for i, calls in enumerate(self.head_logits) if not calls]
        if missing:
            raise TokensieveError(f"training step {self.step}: pruner heads {missing} have not run since set_step")
        padded = []
        for i, calls in enumerate(self.head_logits):
            logits = [row for call in calls for row in call]  # (n_b, 2) each
            if len(logits) != rows:
                raise TokensieveError(f"training step {self.step}: pruner head {i} saw {len(logits)} rows for a "
                                      f"batch of {rows}; run one pruned forward after each set_step")
            width = max(len(row) for row in logits)
            valid = torch.stack([torch.arange(width, device=row.device) < len(row) for row in logits])
            padded.append((torch.stack([F.pad(row, (0, 0, 0, width - len(row))) for row in logits]), valid))
        return padded
