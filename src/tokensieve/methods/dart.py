"""DART: keep pivot tokens and the tokens that duplicate them least.

Scores: a few pivot tokens are chosen by largest L2 norm; every other token is scored by
its highest cosine similarity to any pivot (how much it duplicates one), and the least
duplicated ones are kept alongside the pivots. Acts inside the LLM (default site ``llm.2``,
the paper's layer K=2) or on the projector output.

Differences from the paper's code: the released LLaVA code picks 4 image pivots and 4 text
pivots by the L1 norm of the layer's key states and then lets each pivot in turn claim its
``max_num_trunction // 8`` least similar remaining image tokens (text pivots are dropped
afterwards); it runs on one sample at a time and keeps ``4 + 8 * (T // 8)`` tokens. Here a
method sees only the visual tokens, so all ``pivot_count`` pivots are image tokens, chosen by
the L2 norm of the tokens themselves (no signal needed); the other tokens are ranked
globally by their maximum cosine similarity to any pivot, the budget is met exactly, and
every row of a batch chooses its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import cosine_matrix, gather_tokens, topk_sorted


def dart_keep(tokens: torch.Tensor, keep: int, pivot_count: int) -> torch.Tensor:
    """Pivots plus the least-duplicated tokens, ``keep`` per row.

    tokens: ``(B, N, d)``. Pivots: the ``min(pivot_count, keep)`` tokens of largest L2 norm.
    Every other token's duplication is its maximum cosine similarity to the pivots; the
    ``keep - pivots`` least duplicated are kept with the pivots.
    Returns ``(B, keep)`` sorted indices.
    """
    b, n, _ = tokens.shape
    if not 1 <= keep <= n:
        raise TokensieveError(f"dart: cannot keep {keep} of {n} tokens")
    if pivot_count < 1:
        raise TokensieveError(f"dart: pivot_count must be at least 1, got {pivot_count}")
    x = tokens.float()
    pivots = x.norm(dim=-1).topk(min(pivot_count, keep, n), dim=1).indices  # (B, P)
    duplication = cosine_matrix(x, gather_tokens(x, pivots)).amax(-1)  # (B, N)
    score = (-duplication).scatter(1, pivots, float("inf"))  # pivots always stay
    return topk_sorted(score, keep)


@register
@dataclass
class DART(Method):
    """DART: keep ``pivot_count`` high-norm pivot tokens and the tokens least similar to them.

    Pivots are the tokens of largest L2 norm; the rest of the budget goes to the tokens whose
    maximum cosine similarity to any pivot is lowest, so near-copies of a pivot are dropped
    first. If the budget is smaller than ``pivot_count``, only the top-``keep`` pivots stay.

    pivot_count: number of pivot tokens (the paper's code uses 8 pivots in total, 4 image and
    4 text; here all of them are visual tokens).
    """

    pivot_count: int = 8

    name = "dart"
    paper = ("Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang. Stop Looking for Important Tokens in "
             "Multimodal Language Models: Duplication Matters More. arXiv preprint 2025. arXiv:2502.11494")
    stages = ("llm", "projector")
    default_site = "llm.2"
    signals = ()

    def __post_init__(self):
        if isinstance(self.pivot_count, bool) or not isinstance(self.pivot_count, int) or self.pivot_count < 1:
            raise TokensieveError(f"dart: pivot_count must be a whole number of at least 1, got {self.pivot_count!r}")

    def select(self, inputs: SiteInputs) -> Selection:
        return Selection(dart_keep(inputs.tokens, inputs.keep, self.pivot_count))
