"""Stage 2 of the learned pruner: a head before one LLM decoder layer that decides keep/drop per visual token.

The head reads the visual hidden states and the question's hidden states and gives two logits
per visual token, (drop, keep). Training draws a hard 0/1 keep mask with a straight-through
Gumbel-softmax; inference thresholds the keep probability or keeps an exact budget.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tokensieve.errors import TokensieveError
from tokensieve.learned.precision import cast_like
from tokensieve.learned.token_merger import QuestionCrossAttention
from tokensieve.ops import topk_sorted


class LayerPrunerHead(nn.Module):
    """Keep/drop logits ``(B, N, 2)`` (drop, keep) for visual hidden states ``(B, N, d_model)``.

    d_question: width of the question states (default ``d_model``: the same layer's hidden states).
    init_keep_bias: a fresh head keeps every token with probability ``sigmoid(init_keep_bias)``.
    """

    def __init__(self, d_model: int, d_internal: int = 128, num_heads: int = 4,
                 d_question: int | None = None, init_keep_bias: float = 2.0):
        super().__init__()
        self.d_model = d_model
        self.cross = QuestionCrossAttention(d_model, d_question if d_question is not None else d_model,
                                            d_internal, num_heads)
        self.mlp = nn.Sequential(nn.LayerNorm(d_internal), nn.Linear(d_internal, 2 * d_internal), nn.GELU(),
                                 nn.Linear(2 * d_internal, 2))
        # Zero weights make the fresh head's keep probability exactly sigmoid(init_keep_bias)
        # for every token (start from keeping almost everything); they learn from the first step.
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, init_keep_bias]))

    def forward(self, visual: torch.Tensor, question: torch.Tensor,
                question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """visual ``(B, N, d_model)``; question ``(B, T, d_question)``; question_mask ``(B, T)``
        bool, True = real question token (None = all real). Returns logits ``(B, N, 2)``."""
        if visual.dim() != 3 or visual.shape[-1] != self.d_model:
            raise TokensieveError(f"visual states of shape {tuple(visual.shape)} should be "
                                  f"(B, N, d_model={self.d_model})")
        return self.mlp(self.cross(cast_like(self, visual), cast_like(self, question), question_mask))


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise TokensieveError(f"pruner logits of shape {tuple(logits.shape)} should be (B, N, 2) (drop, keep)")


def training_keep_mask(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard keep mask ``(B, N)`` from logits ``(B, N, 2)``: 0/1 in value, straight-through Gumbel-softmax gradient."""
    _check_logits(logits)
    if tau <= 0:
        raise TokensieveError(f"Gumbel-softmax temperature tau={tau} must be positive")
    return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)[..., 1]


def keep_probability(logits: torch.Tensor) -> torch.Tensor:
    """Probability ``(B, N)`` of keeping each token, the softmax of logits ``(B, N, 2)``."""
    _check_logits(logits)
    return logits.softmax(-1)[..., 1]


def inference_keep(logits: torch.Tensor, budget: int | None = None) -> list[torch.Tensor] | torch.Tensor:
    """Which tokens stay at inference, from logits ``(B, N, 2)``.

    budget None: a list of ``B`` ascending 1-D LongTensors, the tokens with keep probability
        > 0.5; a row that would keep nothing keeps its single most probable token instead.
    budget k: a ``(B, k)`` LongTensor, each row the ascending indices of the ``k`` most probable
        tokens (iterating it gives the same per-row 1-D tensors as the list form).
    """
    p = keep_probability(logits)
    n = p.shape[1]
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
            raise TokensieveError(f"budget={budget} must be between 1 and the {n} visual tokens per row")
        return topk_sorted(p, budget)
    rows = []
    for row in p:
        kept = (row > 0.5).nonzero().squeeze(1)
        rows.append(kept if kept.numel() else row.argmax().reshape(1))
    return rows
