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


def inference_keep(logits: torch.Tensor, budget: int, threshold: float | None = None,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which tokens stay at inference, from logits ``(B, N, 2)``: ``(indices, row_valid)``.

    threshold None: ``indices`` ``(B, budget)``, each row the ascending indices of its ``budget``
        most probable tokens; ``row_valid`` None (static shapes).
    threshold t: each row keeps its tokens with keep probability > t, at most ``budget`` (the
        most probable) and at least one (its most probable). Rows keep different counts, so
        ``indices`` ``(B, K)`` (ascending, K the largest count) pads a shorter row with its next
        most probable tokens and ``row_valid`` ``(B, K)`` bool is False on that padding.
    valid: optional ``(B, N)`` bool, False for tokens that are only padding already; they are
        ranked below every other token and never counted above the threshold.
    """
    p = keep_probability(logits)
    n = p.shape[1]
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
        raise TokensieveError(f"budget={budget} must be between 1 and the {n} visual tokens per row")
    if threshold is not None and not 0 <= threshold < 1:
        raise TokensieveError(f"keep threshold {threshold} must be in [0, 1)")
    if valid is not None:
        p = p.masked_fill(~valid, -1.0)  # below any probability
    if threshold is None:
        return topk_sorted(p, budget), None
    counts = (p > threshold).sum(1).clamp(1, budget)  # (B,)
    indices = topk_sorted(p, int(counts.max()))
    rank = p.gather(1, indices).argsort(1, descending=True).argsort(1)  # 0 = the row's most probable slot
    return indices, rank < counts[:, None]
