"""DivPrune: keep the most diverse subset of visual tokens (max-min diversity).

Scores: cosine distance ``1 - cos`` between tokens; a greedy max-min diversity (MMDP)
selection keeps tokens that are far from everything already kept. Acts, like the released
code (``LAYER_INDEX=0``), on the LLM's input embeddings of the image: the projector's output,
site ``llm.0`` (the default).

As the released code (vbdi/divprune, ``LlavaMetaForCausalLM.DivPrune``): distances in the
tokens' dtype (float16 for the paper's LLaVA runs), the first pick maximises each token's
second-smallest distance in its column of the distance matrix (the smallest being its
distance to itself), every next pick the minimum distance to the picks so far, ties to the
lowest index, ``round(ratio * N)`` kept (the stage's budget; the paper's 0.098 keeps 56 of
576). The reference sorts the picks before gathering them, as we do.

Differences from the paper's code: the released code handles one image of a batch of one
(rows ``35:35+576`` of the sequence, a template-specific offset); here every row of a batch
runs its own greedy selection on its own image run (one sequential loop over the picks, each
step over every row at once on the tokens' device). Tokens already chosen are masked out, so exact duplicates can never be chosen twice:
the released code does not mask them, and once every distinct token is picked its argmax
over rounding noise can return a token already chosen (a repeated index, which a selection
cannot hold). Sites other than ``llm.0`` are ours: ``projector`` (the tower's output, before
the projector) and ``llm.K`` for ``K >= 1`` (the hidden states before decoder layer ``K``; the
released code prunes at layer 0 only). ``full_precision=True`` (ours, off by default) computes
the distances in float32 whatever the tokens' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import cosine_matrix


def greedy_max_min(dist: torch.Tensor, first_score: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min diverse picks for each row, in selection order, on ``dist``'s device.

    dist: ``(B, N, N)`` pairwise distances, contiguous, overwritten: its diagonal becomes ``-inf``, so
    that a pick's own distance marks it chosen (never picked again, even among exact duplicates);
    first_score: ``(B, N)`` what the first pick maximises (each token's distance to its nearest
    other token); returns ``(B, keep)`` indices. One step per pick, each over every row at once and
    on the device: the host never waits for a pick. A step is three torch calls (argmax, a row read
    by index_select, minimum), as the loop's time is their dispatch, not their work.
    """
    b, n, _ = dist.shape
    dist.diagonal(dim1=-2, dim2=-1).fill_(-torch.inf)
    rows = dist.view(b * n, n)  # row r of batch row i at i * n + r
    offsets = torch.arange(0, b * n, n, device=dist.device) if b > 1 else None
    to_chosen = first_score  # (B, N) distance of every token to the chosen set
    picks = []
    for step in range(keep):
        pick = to_chosen.argmax(1)  # (B,): first maximal index on ties, as the reference's argmax
        picks.append(pick)
        if step + 1 < keep:
            row = rows.index_select(0, pick if offsets is None else pick + offsets)  # (B, N): distances from the pick
            # The first pick's distances replace the first scores; later ones lower them.
            to_chosen = row if step == 0 else torch.minimum(to_chosen, row, out=to_chosen)
    return torch.stack(picks, 1)


def second_smallest(values: torch.Tensor) -> torch.Tensor:
    """``(B, R, N)`` -> ``(B, N)``: each column's second smallest value (repeats count), exactly
    ``values.topk(2, dim=-2, largest=False).values[:, 1]`` (NaN aside: here it spreads, topk sorts
    it last). On a CPU, where topk along the strided dimension is slow (2-9x the time of this at 576
    to 1,334 rows), it pairs the rows up, halving them each round: the smallest of all stays among
    the lower of each pair, so the second smallest is the second smallest of the lowers or the
    smallest of the uppers (of the pair that held the smallest). ``values`` is left as it is.
    """
    if values.device.type != "cpu":  # one topk kernel there, against four launches a round below
        return values.topk(2, dim=-2, largest=False).values[:, 1]
    uppers = None  # (B, N) the smallest of the uppers so far
    while values.shape[1] > 1:
        half = values.shape[1] // 2
        top, bottom = values[:, :half], values[:, half:2 * half]
        lower = torch.minimum(top, bottom)  # a new tensor: the odd row below never writes into ``values``
        upper = torch.maximum(top, bottom).amin(1)
        uppers = upper if uppers is None else torch.minimum(uppers, upper, out=uppers)
        if values.shape[1] % 2:  # the odd last row pairs with the first lower
            last = values[:, -1]
            torch.minimum(uppers, torch.maximum(lower[:, 0], last), out=uppers)
            torch.minimum(lower[:, 0], last, out=lower[:, 0])
        values = lower
    return uppers


def divprune_keep(tokens: torch.Tensor, keep: int, full_precision: bool = False) -> torch.Tensor:
    """Greedy max-min diverse subset of ``keep`` tokens per row.

    tokens: ``(B, N, d)``. Distance is ``1 - cos``, computed in the tokens' dtype (float32 with
    ``full_precision``). The first pick is the token whose distance to its nearest other token
    is largest; each next pick is the unchosen token whose minimum distance to the chosen set
    is largest (ties go to the lowest index). Everything runs on the tokens' device, batched over
    the rows. Returns ``(B, keep)`` sorted indices.
    """
    b, n, _ = tokens.shape
    if not 1 <= keep <= n:
        raise TokensieveError(f"divprune: cannot keep {keep} of {n} tokens")
    if keep == n:
        return torch.arange(n, device=tokens.device).expand(b, n).clone()
    x = tokens.detach()  # choosing is not differentiable
    if full_precision:
        x = x.float()
    dist = cosine_matrix(x, x).neg_().add_(1.0)  # (B, N, N) 1 - cos, in place: no second N x N
    # The second smallest of each column: the smallest is the token's distance to itself, which
    # rounding leaves near but not always at 0, so it is not simply masked out.
    first_score = second_smallest(dist)  # (B, N)
    return greedy_max_min(dist, first_score, keep).sort(1).values


@register
@dataclass
class DivPrune(Method):
    """DivPrune: keep a max-min diverse subset of the tokens (greedy MMDP on cosine distance).

    Starts from the token farthest (by its nearest neighbour) from all others, then adds, one
    at a time, the token whose minimum cosine distance to the kept set is largest. Needs no
    signal; the paper's kept share (0.098 for LLaVA-1.5) is the stage's budget. Default site
    ``llm.0``, the projector's output, as in the released code.

    full_precision: ours, off by default: distances in float32 rather than in the tokens'
    dtype (the released code computes them in the model's dtype, float16 in its runs, where
    near-ties resolve to the lowest index).
    """

    name = "divprune"
    paper = ("Ranjbar Alvar, Singh, Akbari, Zhang. DivPrune: Diversity-based Visual Token Pruning for Large "
             "Multimodal Models. CVPR 2025. arXiv:2503.02175")
    stages = ("projector", "llm")
    default_site = "llm.0"
    handles_video = True  # pairwise distances over the set of tokens, no grid assumed
    signals = ()

    full_precision: bool = False

    def select(self, inputs: SiteInputs) -> Selection:
        return Selection(divprune_keep(inputs.tokens, inputs.keep, self.full_precision))
