"""VisPruner: important patches by CLS attention, then diverse ones left after removing duplicates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.methods.tower_importance import importance_signals
from tokensieve.ops import gather_tokens


def vispruner_split(keep: int, important_ratio: float) -> tuple[int, int]:
    """``(important, diverse)`` counts for a budget of ``keep``: ``int(keep * important_ratio)``
    (rounded down, as the reference does) important tokens, the rest diverse."""
    important = int(keep * important_ratio)
    return important, keep - important


def vispruner_keep(tokens: torch.Tensor, cls_attention: torch.Tensor, important: int, diverse: int,
                   drop_per_round: int = 8) -> torch.Tensor:
    """Indices ``(B, important + diverse)``, sorted, of the important and the diverse tokens.

    tokens: ``(B, N, d)`` the features compared (the tower's feature-layer patch states).
    cls_attention: ``(B, N)`` CLS attention, head-averaged.
    The ``important`` tokens with the highest attention are kept. The others, ranked by
    attention (highest first), are thinned in rounds until ``diverse`` remain: each round
    splits the ranked list into its even and odd positions, scores every even-position token
    by its highest cosine similarity to an odd-position one, and removes the
    ``min(drop_per_round, remaining - diverse)`` highest-scoring (most duplicated); the list
    for the next round is the surviving even-position tokens, most similar first, followed by
    the odd-position tokens in their order. An odd-length list gives the even positions one
    more token (the reference fails on that case; see docs).
    """
    order = cls_attention.argsort(dim=1, descending=True)  # (B, N)
    chosen, rest = order[:, :important], order[:, important:]
    if diverse == 0:
        return chosen.sort(1).values
    unit = nn.functional.normalize(tokens, dim=-1)
    while (drop := min(drop_per_round, rest.shape[1] - diverse)) > 0:
        even, odd = rest[:, ::2], rest[:, 1::2]  # (B, ceil(R/2)), (B, floor(R/2))
        likeness = (gather_tokens(unit, even) @ gather_tokens(unit, odd).transpose(1, 2)).max(-1).values
        survivors = likeness.argsort(dim=1, descending=True)[:, drop:]
        rest = torch.cat([even.gather(1, survivors), odd], 1)
    return torch.cat([chosen, rest], 1).sort(1).values


@register
@dataclass
class VisPruner(Method):
    """VisPruner: ``important_ratio`` of the budget goes to the patches the CLS token attends to
    most; the rest goes to patches left after repeatedly removing near-duplicates from the
    remainder (bipartite matching by cosine similarity of the tower's features).

    Scores: ``cls_attention`` (B, N) (feature block, CLS row, softmax per head, mean over
    heads) picks the important tokens; the site's tokens themselves (in LLaVA the tower's
    feature-layer patch states, before the projector) are compared for duplicates. Acts on the
    tower's output (default site ``projector``). Defaults reproduce Theia-4869/VisPruner
    ``encode_images``: ``important_ratio`` 0.5 (its evaluation scripts' default; its README's
    64-token MME run uses 0.75) and 8 tokens removed per round (``drop_per_round``). Kept
    tokens stay in image order; no token is added (tests/test_parity_vispruner.py).

    Beyond the paper: budgets whose remainder has an odd length, where the released code fails
    (see :func:`vispruner_keep`), any vision block's input as a site (``vision.K``), and any
    ``drop_per_round``.

    Ours, off by default: ``importance="received_attention"`` picks the important tokens by the
    attention each token receives in the tower's last block, for towers without CLS (Qwen-VL). The
    authors' SigLIP path ranks by that kind of attention (mean over queries and heads: same order
    within an image) and they describe it for Qwen2.5-VL, but released no Qwen port (docs/methods.md).
    """

    name = "vispruner"
    paper = ("Zhang, Cheng, Lu, Zhang, Zhuo, Cao, Guo, She, Zhang. Beyond Text-Visual Attention: Exploiting "
             "Visual Cues for Effective Token Pruning in VLMs. ICCV 2025. arXiv:2412.01818 (v2)")
    stages = ("vision", "projector")
    default_site = "projector"
    signals = ("cls_attention",)
    no_cls_options = {"importance": "received_attention"}  # its variant for a tower without CLS (ours)

    important_ratio: float = 0.5
    drop_per_round: int = 8
    importance: str = "cls_attention"

    def __post_init__(self):
        self.signals = importance_signals(self.name, self.importance, type(self).signals)

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if not 0 <= self.important_ratio <= 1:
            raise TokensieveError(f"vispruner: important_ratio {self.important_ratio} is not in [0, 1]")
        if isinstance(self.drop_per_round, bool) or not isinstance(self.drop_per_round, int) \
                or self.drop_per_round < 1:
            raise TokensieveError(f"vispruner: drop_per_round {self.drop_per_round!r} is not a whole number >= 1")

    def select(self, inputs: SiteInputs) -> Selection:
        self.check(inputs.tokens.shape[1], inputs.keep, inputs.site)
        att = inputs.signal(self.importance)
        important, diverse = vispruner_split(inputs.keep, self.important_ratio)
        indices = vispruner_keep(inputs.tokens, att, important, diverse, self.drop_per_round)
        return Selection(indices.to(inputs.tokens.device))
