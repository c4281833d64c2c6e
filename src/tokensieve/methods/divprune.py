"""DivPrune: keep the most diverse subset of visual tokens (max-min diversity).

Scores: cosine distance ``1 - cos`` between tokens; a greedy max-min diversity (MMDP)
selection keeps tokens that are far from everything already kept. Acts on the projector
output (default site ``projector``) or on the LLM's visual hidden states.

Differences from the paper's code: the released code handles one image at a time and
returns the indices in selection order; here every row of a batch runs its own greedy
selection (the distance matrix on the tokens' device, the sequential loop in NumPy on the
host), indices come back sorted, and tokens already chosen are masked out, so exact
duplicates (all distances 0) can never be chosen twice. The paper's kept share
(``threshold_ratio``) is the stage's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import cosine_matrix


def greedy_max_min(dist: np.ndarray, first_nearest: np.ndarray, keep: int) -> np.ndarray:
    """Greedy max-min diverse picks for each row, in selection order.

    dist: ``(B, N, N)`` pairwise distances; first_nearest: ``(B, N)`` each token's distance to
    its nearest other token (what the first pick maximises); returns ``(B, keep)`` indices.
    The loop is sequential by nature, so it runs in NumPy, one step for all rows at once: a
    step costs a few microseconds against the tens a torch op dispatch costs, which at 190
    picks was most of the method's share of the prefill.
    """
    rows = np.arange(dist.shape[0])
    to_chosen = first_nearest.copy()  # (B, N) distance of every token to the chosen set
    picks = np.empty((dist.shape[0], keep), dtype=np.int64)
    for step in range(keep):
        pick = to_chosen.argmax(1)  # first maximal index on ties, like torch.argmax
        picks[:, step] = pick
        if step == 0:
            to_chosen[:] = dist[rows, pick]  # distances to the first pick replace those to all others
        else:
            np.minimum(to_chosen, dist[rows, pick], out=to_chosen)
        to_chosen[rows, pick] = -np.inf  # a chosen token is never picked again, even among duplicates
    return picks


def divprune_keep(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min diverse subset of ``keep`` tokens per row.

    tokens: ``(B, N, d)``. Distance is ``1 - cos``. The first pick is the token whose
    minimum distance to all others is largest; each next pick is the unchosen token whose
    minimum distance to the chosen set is largest (ties go to the lowest index).
    The distance matrix is computed on the tokens' device; the greedy loop runs on the host.
    Returns ``(B, keep)`` sorted indices.
    """
    b, n, _ = tokens.shape
    if not 1 <= keep <= n:
        raise TokensieveError(f"divprune: cannot keep {keep} of {n} tokens")
    if keep == n:
        return torch.arange(n, device=tokens.device).expand(b, n).clone()
    x = tokens.detach().float()  # choosing is not differentiable
    dist = cosine_matrix(x, x).neg_().add_(1.0)  # (B, N, N) 1 - cos, in place: no second N x N
    # A token is not its own neighbour. Harmless to the loop: a pick's own entry is set to -inf.
    dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    nearest = dist.amin(-1)  # (B, N)
    dist_np, nearest_np = dist.cpu().numpy(), nearest.cpu().numpy()
    picks = greedy_max_min(dist_np, nearest_np, keep)
    return torch.from_numpy(np.sort(picks, -1)).to(tokens.device)


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
