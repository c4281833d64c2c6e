"""FastV: drop the image tokens the last text token attends to least, inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import topk_sorted


def fastv_keep(text_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` image tokens with the highest attention from the last text token.

    text_attention: ``(B, N)`` the last token's attention over the ``N`` image tokens one
        LLM layer before the site, averaged over heads.
    Returns ``(B, keep)`` sorted indices, chosen per row.
    """
    return topk_sorted(text_attention, keep)


@register
@dataclass
class FastV(Method):
    """FastV: rank image tokens by the attention the last text token pays them at layer K-1
    (averaged over heads) and keep the top ones from layer K on.

    Scores: ``text_attention`` (B, N). Acts inside the LLM, before decoder layer K (site
    ``llm.K``; the paper's K=2 is the default site ``llm.2``). The paper's second parameter,
    the kept share R (50% in the paper), is the stage's budget here (``budget=0.5``), so the
    method itself has no parameters.

    Differences from the paper's code: the released code asks the decoder for the full
    attention maps (``output_attentions``) of layer K-1 and handles one sample at a time
    (``[0]``); here the backbone recomputes only the last query's attention row from the
    layer's own q/k projections, and every row of a batch chooses its own tokens. Budgets are
    exact token counts rather than ``int(N * R)``.
    """

    name = "fastv"
    paper = ("Chen, Zhao, Chen, Wang, Zhou, Lin, Chang. An Image is Worth 1/2 Tokens After Layer 2: "
             "Plug-and-Play Inference Acceleration for Large Vision-Language Models. ECCV 2024. "
             "arXiv:2403.06764")
    stages = ("llm",)
    default_site = "llm.2"
    signals = ("text_attention",)

    def select(self, inputs: SiteInputs) -> Selection:
        att = inputs.signal("text_attention")
        return Selection(fastv_keep(att, inputs.keep).to(inputs.tokens.device))
