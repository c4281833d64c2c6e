"""DivPrune: keep the most diverse subset of visual tokens (max-min diversity).

Scores: cosine distance ``1 - cos`` between tokens; a greedy max-min diversity (MMDP)
selection keeps tokens that are far from everything already kept. Acts on the projector
output (default site ``projector``) or on the LLM's visual hidden states.

Differences from the paper's code: the released code handles one image at a time and
returns the indices in selection order; here every row of a batch runs its own greedy
selection in one batched tensor loop, indices come back sorted, and tokens already chosen
are masked out, so exact duplicates (all distances 0) can never be chosen twice. The paper's
kept share (``threshold_ratio``) is the stage's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import cosine_matrix


def divprune_keep(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min diverse subset of ``keep`` tokens per row.

    tokens: ``(B, N, d)``. Distance is ``1 - cos``. The first pick is the token whose
    minimum distance to all others is largest; each next pick is the unchosen token whose
    minimum distance to the chosen set is largest (ties go to the lowest index).
    Returns ``(B, keep)`` sorted indices.
    """
    b, n, _ = tokens.shape
    if not 1 <= keep <= n:
        raise TokensieveError(f"divprune: cannot keep {keep} of {n} tokens")
    if keep == n:
        return torch.arange(n, device=tokens.device).expand(b, n).clone()
    x = tokens.detach().float()  # choosing is not differentiable
    dist = 1.0 - cosine_matrix(x, x)  # (B, N, N)
    eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
    rows = torch.arange(b, device=tokens.device)
    picks = torch.empty(b, keep, dtype=torch.long, device=tokens.device)

    # Distance of every token to the chosen set; before any pick, to all the other tokens.
    # A chosen token's entry is -inf, which the running minimum keeps, so it is never picked
    # again: a few small in-place steps per pick keep the loop's overhead low.
    to_chosen = dist.masked_fill(eye, float("inf")).amin(-1)  # (B, N)
    for step in range(keep):
        pick = to_chosen.argmax(-1)  # (B,)
        picks[:, step] = pick
        if step == 0:
            to_chosen = dist[rows, pick]  # distances to the first pick replace those to all others
        else:
            torch.minimum(to_chosen, dist[rows, pick], out=to_chosen)
        to_chosen[rows, pick] = float("-inf")
    return picks.sort(-1).values


@register
@dataclass
class DivPrune(Method):
    """DivPrune: keep a max-min diverse subset of the tokens (greedy MMDP on cosine distance).

    Starts from the token farthest (by its nearest neighbour) from all others, then adds, one
    at a time, the token whose minimum cosine distance to the kept set is largest. Needs no
    signal and has no parameters: the paper's kept share is the stage's budget.
    """

    name = "divprune"
    paper = ("Ranjbar Alvar, Singh, Akbari, Zhang. DivPrune: Diversity-based Visual Token Pruning for Large "
             "Multimodal Models. CVPR 2025. arXiv:2503.02175")
    stages = ("projector", "llm")
    default_site = "projector"
    signals = ()

    def select(self, inputs: SiteInputs) -> Selection:
        return Selection(divprune_keep(inputs.tokens, inputs.keep))
