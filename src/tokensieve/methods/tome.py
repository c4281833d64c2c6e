"""ToMe: merge tokens by bipartite soft matching instead of dropping them.

Scores: the cosine similarity of each token to its best partner on the other side of an
alternating split (attention ``keys`` when the site provides them, else the tokens). Acts
in the vision encoder (default site ``vision.1``) or on the projector output. The kept
slots hold size-weighted means of everything merged into them.

Differences from the paper's code: the released code merges a fixed ``r`` tokens in every
ViT block (at most half of them per block, class token protected) and reorders the output as
``[unmerged A, B]``; here one site merges straight down to the stage's exact budget, in as
many matching rounds as that needs (each round merges at most ``|A|`` tokens and recomputes
the split on the survivors, whose keys are the size-weighted means of the merged keys), and
survivors stay at their original positions. Prefix tokens (CLS) never reach a method, so
nothing needs protecting. Token sizes are not carried on to proportional attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import cosine_matrix, gather_tokens, merge_into


def _matching_round(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, pos: torch.Tensor,
                    r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bipartite soft matching step merging ``r <= |A|`` tokens of every row.

    x: ``(B, n, d)`` contents; metric: ``(B, n, m)`` what similarity is measured on;
    size: ``(B, n)`` how many original tokens each one stands for; pos: ``(B, n)`` original
    indices, ascending. Returns the same four for the ``n - r`` survivors, ascending by ``pos``.
    """
    xa, xb = x[:, ::2], x[:, 1::2]
    ma, mb = metric[:, ::2], metric[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    pa, pb = pos[:, ::2], pos[:, 1::2]

    best, match = cosine_matrix(ma, mb).max(-1)  # (B, |A|): each A token's best B partner
    order = best.argsort(dim=-1, descending=True, stable=True)
    src, unmerged = order[:, :r], order[:, r:].sort(-1).values
    dst = match.gather(1, src)  # (B, r) index into B

    src_size = sa.gather(1, src)
    xb = merge_into(xb, gather_tokens(xa, src), dst, sb, src_size)
    mb = merge_into(mb, gather_tokens(ma, src), dst, sb, src_size)
    sb = sb.scatter_add(1, dst, src_size)

    x = torch.cat([gather_tokens(xa, unmerged), xb], 1)
    metric = torch.cat([gather_tokens(ma, unmerged), mb], 1)
    size = torch.cat([sa.gather(1, unmerged), sb], 1)
    pos = torch.cat([pa.gather(1, unmerged), pb], 1)
    back = pos.argsort(-1)
    return gather_tokens(x, back), gather_tokens(metric, back), size.gather(1, back), pos.gather(1, back)


def tome_merge(tokens: torch.Tensor, keep: int,
               metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each row of ``tokens`` down to ``keep`` tokens by bipartite soft matching.

    tokens: ``(B, N, d)``; metric: optional ``(B, N, m)`` features to match on (attention
    keys), defaulting to the tokens. Each round splits the current tokens into A (even
    positions) and B (odd), matches every A token to its most similar B token and merges the
    ``min(|A|, still to merge)`` best-matched A tokens into their partners by size-weighted
    mean (sizes start at 1). Rounds repeat until ``N - keep`` merges are done.
    Returns ``(indices (B, keep), merged (B, keep, d))``: the survivors' original indices in
    ascending order and their merged contents (``tokens`` itself when ``keep == N``).
    """
    b, n, _ = tokens.shape
    if not 1 <= keep <= n:
        raise TokensieveError(f"tome: cannot keep {keep} of {n} tokens")
    pos = torch.arange(n, device=tokens.device).expand(b, n)
    if keep == n:
        return pos.clone(), tokens
    if metric is None:
        metric = tokens
    if metric.shape[:2] != tokens.shape[:2]:
        raise TokensieveError(f"tome: metric of shape {tuple(metric.shape)} does not match tokens "
                              f"of shape {tuple(tokens.shape)}")
    x, metric = tokens.float(), metric.float()
    size = x.new_ones(b, n)
    while x.shape[1] > keep:
        current = x.shape[1]
        r = min(current - keep, (current + 1) // 2)  # |A| = ceil(current / 2)
        x, metric, size, pos = _matching_round(x, metric, size, pos, r)
    return pos, x.to(tokens.dtype)


@register
@dataclass
class ToMe(Method):
    """ToMe (bipartite soft matching): merge the most similar tokens instead of dropping them.

    Similarity: cosine of the attention ``keys`` (tokens if the site has no keys) between
    the even-position set A and the odd-position set B. The ``N - keep`` best-matched A
    tokens are merged into their B partners by size-weighted mean, in repeated rounds if
    that is more than ``|A|``. Kept slots are the survivors at their original indices, holding
    the merged means. No parameters: the paper's per-layer ``r`` is the stage's budget.
    """

    name = "tome"
    paper = ("Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman. Token Merging: Your ViT But Faster. "
             "ICLR 2023. arXiv:2210.09461")
    stages = ("vision", "projector")
    default_site = "vision.1"
    signals = ("keys",)

    def select(self, inputs: SiteInputs) -> Selection:
        metric = None
        if inputs.keep < inputs.tokens.shape[1] and "keys" in inputs.signals:
            metric = inputs.signal("keys")
        indices, merged = tome_merge(inputs.tokens, inputs.keep, metric)
        return Selection(indices, merged)
