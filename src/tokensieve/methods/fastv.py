"""FastV: drop the image tokens the last text token attends to least, inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import topk_sorted


def fastv_keep(text_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` image tokens with the highest attention from the last text token.

    text_attention: ``(B, N)`` the last token's attention weights (softmax over its whole
        causal row) at the ``N`` image columns, at the LLM layer before the site, averaged over
        heads.
    Returns ``(B, keep)`` sorted indices, chosen per row; ties are ``torch.topk``'s, as in the
    released code.
    """
    return topk_sorted(text_attention, keep)


@register
@dataclass
class FastV(Method):
    """FastV: rank image tokens by the attention the last text token pays them at layer K-1
    (averaged over heads) and keep the top ones from layer K on.

    Scores: ``text_attention`` (B, N): decoder layer K-1's attention weights of the prompt's
    last token (softmax over all its causal positions, per head), mean over heads, at the
    image columns. Acts inside the LLM, before decoder layer K (site ``llm.K``; the paper's
    K=2 is the default site ``llm.2``). The paper's R is the share of image tokens DROPPED
    (R=50% in the paper); the stage's budget is the share kept, ``1 - R`` (``budget=0.5``),
    and a ratio budget keeps ``round(N * (1 - R))``, the released scripts' attention rank
    (72/144/288/432 of 576 for R = 87.5/75/50/25%). The method itself has no parameters.

    As the released code (pkunlp-icler/FastV, ``LlamaModel.forward``): head mean of the
    attention probabilities, last query row, image columns only, ``topk``, kept tokens in
    their original order and positions.

    Differences from the paper's code: the released code asks the decoder for the full
    attention maps (``output_attentions``) of layer K-1 and reads row ``[0]`` of the batch;
    here the backbone recomputes only the last query's attention row from the layer's own
    q/k projections, and every row of a batch chooses its own tokens. The selection is made
    once, on the prompt, and the KV cache keeps it (the released KV-cache variant); the
    released attention-mask variant, run without a cache, re-ranks at every generated token.
    The released K=0 drops image tokens at random (method ``random`` at ``llm.0``).
    """

    name = "fastv"
    paper = ("Chen, Zhao, Liu, Bai, Lin, Zhou, Chang. An Image is Worth 1/2 Tokens After Layer 2: "
             "Plug-and-Play Inference Acceleration for Large Vision-Language Models. ECCV 2024. "
             "arXiv:2403.06764")
    stages = ("llm",)
    default_site = "llm.2"
    handles_video = True  # the text's attention over the tokens, no grid assumed
    signals = ("text_attention",)

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if site == "llm.0":
            raise TokensieveError("fastv at llm.0: it ranks by the attention of the layer before its site, so "
                                  "it acts at llm.K with K >= 1 (the paper's K=0 is a random drop: method 'random')")

    def select(self, inputs: SiteInputs) -> Selection:
        att = inputs.signal("text_attention")
        return Selection(fastv_keep(att, inputs.keep).to(inputs.tokens.device))
