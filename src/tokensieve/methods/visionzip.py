"""VisionZip: keep the tokens CLS attends to most, merge the rest into a few contextual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import complement, cosine_matrix, gather_tokens, merge_into


def visionzip_split(keep: int, dominant_ratio: float) -> tuple[int, int]:
    """``(dominant, contextual)`` counts for a budget of ``keep`` tokens.

    ``round(dominant_ratio * keep)`` dominant tokens, the rest contextual; with the default
    54/64 this gives the paper's 54+10 (64), 108+20 (128) and 162+30 (192).
    """
    dominant = min(keep, max(0, round(dominant_ratio * keep)))
    return dominant, keep - dominant


def visionzip_reduce(tokens: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor,
                     dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dominant tokens by CLS attention plus contextual tokens merged by key similarity.

    tokens: ``(B, N, d)``; cls_attention: ``(B, N)``; keys: ``(B, N, d_k)``.
    dominant: how many tokens are kept by highest CLS attention (unchanged).
    contextual: how many of the remaining ``R = N - dominant`` tokens (taken in index order)
        serve as targets, spaced every ``max(1, R // contextual)`` positions from the first;
        every other remaining token joins the target whose key is most cosine-similar, and a
        target's new content is the plain mean of itself and the tokens that joined it.
    Returns ``indices`` ``(B, dominant + contextual)`` sorted (dominant and target indices
    together) and ``contents`` ``(B, dominant + contextual, d)`` aligned with them, or
    ``None`` when nothing was merged (then every kept token is unchanged).
    """
    b, n, _ = tokens.shape
    dom = cls_attention.topk(dominant, dim=1).indices  # (B, dominant)
    if contextual == 0:
        return dom.sort(1).values, None
    rest = complement(dom, n)  # (B, R) in index order
    r = rest.shape[1]
    step = max(1, r // contextual)
    slots = torch.arange(0, r, step, device=tokens.device)[:contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=tokens.device)
    is_target[slots] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]  # (B, C), (B, R - C)
    indices = torch.cat([dom, targets], 1)
    if others.shape[1] == 0:
        return indices.sort(1).values, None
    similarity = cosine_matrix(gather_tokens(keys.float(), others), gather_tokens(keys.float(), targets))
    assign = similarity.argmax(-1)  # (B, R - C) index into the targets
    merged = merge_into(gather_tokens(tokens, targets).float(), gather_tokens(tokens, others).float(), assign)
    contents = torch.cat([gather_tokens(tokens, dom), merged.to(tokens.dtype)], 1)
    indices, order = indices.sort(1)
    return indices, gather_tokens(contents, order)


@register
@dataclass
class VisionZip(Method):
    """VisionZip: dominant tokens by CLS attention, contextual tokens by merging the rest.

    Scores: ``cls_attention`` (B, N) picks the ``round(dominant_ratio * keep)`` dominant
    tokens; ``keys`` (B, N, d_k) (the block's attention keys averaged over heads) decide which
    contextual target each remaining token merges into (highest cosine similarity). Acts on
    the vision tower's output (default site ``projector``) or before a vision block.

    Differences from the paper's code: the released code counts the CLS token as one of the
    dominant tokens (it keeps CLS plus ``dominant - 1`` patches and feeds CLS to the LLM); here
    CLS is a prefix token the backbone handles and all ``dominant`` tokens are patches. The
    released code sums CLS attention over heads (same ranking as our mean) and emits dominant
    tokens then contextual tokens in that order; here the kept slots stay in their original
    order (sorted indices) so positions are preserved. Decisions are per row, as in the paper.
    """

    name = "visionzip"
    paper = ("Yang, Chen, Tian, Wang, Yang, Yu, Jia. VisionZip: Longer is Better but Not Necessary "
             "in Vision Language Models. CVPR 2025. arXiv:2412.04467")
    stages = ("vision", "projector")
    default_site = "projector"
    signals = ("cls_attention", "keys")

    dominant_ratio: float = 54 / 64

    def select(self, inputs: SiteInputs) -> Selection:
        if not 0 <= self.dominant_ratio <= 1:
            raise TokensieveError(f"visionzip: dominant_ratio {self.dominant_ratio} is not in [0, 1]")
        att, keys = inputs.signal("cls_attention"), inputs.signal("keys")
        dominant, contextual = visionzip_split(inputs.keep, self.dominant_ratio)
        indices, contents = visionzip_reduce(inputs.tokens, att, keys, dominant, contextual)
        return Selection(indices, contents)
