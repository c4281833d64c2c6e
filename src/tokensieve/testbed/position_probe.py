"""Stage-2 auxiliary loss for a testbed whose tower leaves its tokens no absolute place (Qwen):
each visual token names its own row and column from the LLM's hidden state at a chosen layer.

The LLaVA testbed's tokens carry their place from the tower (an absolute position embedding and
stage-1 row and column labels). The Qwen2.5-VL tower has only 2-D RoPE, which shapes attention
scores but mixes content-only values, so on a uniform background no token learns where it lies.
The LLM can: its M-RoPE ids and its causal mask make attention from a visual token to the fixed
prompt prefix depend on the token's (row, column). This loss asks it to, before the mention
lookups (:mod:`.mention_probe`) read "where is the red circle" from the tokens. The heads are
discarded after training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def visual_position_targets(input_ids: torch.Tensor, image_token_id: int, grids: list[tuple[int, int]]
                            ) -> torch.Tensor:
    """``(R, 4)`` rows ``[batch row, sequence position, token row, token column]``, one per visual token.

    input_ids: ``(B, L)`` with one image per row, its tokens row-major; grids: each row's image in
    tokens, ``(rows, columns)``.
    """
    targets = []
    for b, (ids, (rows, cols)) in enumerate(zip(input_ids, grids)):
        positions = (ids == image_token_id).nonzero().flatten()
        if len(positions) != rows * cols:
            raise ValueError(f"row {b} has {len(positions)} image tokens, its grid {rows}x{cols} needs {rows * cols}")
        grid_rows = torch.arange(rows).repeat_interleave(cols)
        grid_cols = torch.arange(cols).repeat(rows)
        targets.append(torch.stack([torch.full_like(positions, b), positions, grid_rows, grid_cols], 1))
    return torch.cat(targets)


class VisualPositionProbe(nn.Module):
    """A row head and a column head on the LLM's hidden state ``layer`` (0 = embeddings) of every visual token.

    grid: the largest side in tokens (the number of row and column classes).
    """

    def __init__(self, hidden: int, grid: int, layer: int):
        super().__init__()
        self.layer = layer
        self.row, self.col = nn.Linear(hidden, grid), nn.Linear(hidden, grid)

    def loss(self, hidden_states: tuple[torch.Tensor, ...], targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean of the row and column cross-entropies, and each head's accuracy.

        hidden_states: the LLM's ``(B, L, d)`` states per layer; targets: ``(R, 4)`` from
        :func:`visual_position_targets`.
        """
        states = hidden_states[self.layer][targets[:, 0], targets[:, 1]]  # (R, d)
        row_logits, col_logits = self.row(states), self.col(states)
        loss = 0.5 * (F.cross_entropy(row_logits, targets[:, 2]) + F.cross_entropy(col_logits, targets[:, 3]))
        stats = {"row_acc": float((row_logits.argmax(-1) == targets[:, 2]).float().mean()),
                 "col_acc": float((col_logits.argmax(-1) == targets[:, 3]).float().mean())}
        return loss, stats
