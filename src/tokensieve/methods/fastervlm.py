"""FasterVLM: keep the patches the vision tower's CLS token attends to most, before the projector."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.methods.tower_importance import importance_signals
from tokensieve.ops import topk_sorted


def fastervlm_keep(cls_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` patches with the highest CLS attention, per row.

    cls_attention: ``(B, N)`` the CLS row of the feature block's attention (softmax per head
        over CLS and the ``N`` patches, averaged over heads, CLS column dropped).
    Returns ``(B, keep)`` sorted indices (the kept tokens stay in image order, as the
    reference's index mask leaves them). Ties go as ``torch.topk`` breaks them, like the reference.
    """
    return topk_sorted(cls_attention, keep)


@register
@dataclass
class FasterVLM(Method):
    """FasterVLM: rank the image patches by the [CLS] attention of the vision tower's feature
    layer and keep the top ones; the rest never reach the projector or the LLM.

    Scores: ``cls_attention`` (B, N): in LLaVA-1.5 the attention of the block whose output is
    the feature layer (``vision_feature_layer`` -2, the penultimate block), CLS row, softmax
    per head over CLS and the patches, mean over heads, CLS column dropped. Acts on the
    tower's output (default site ``projector``); the budget is the reference's
    ``visual_token_num`` (the paper's 144/58/29 for 75/90/95% reduction), so the method has no
    parameters. Kept tokens stay in image order; no token is added. Reproduces
    Theia-4869/FasterVLM ``encode_images`` (tests/test_parity_fastervlm.py).

    Beyond the paper: any vision block's input as a site (``vision.K``, ranking by block K-1's
    CLS attention) and any budget; every row of a batch chooses its own tokens, as in the reference.

    Ours, off by default: ``importance="received_attention"`` ranks by the attention each token
    receives in the tower's last block instead, for towers without CLS (Qwen-VL; the authors
    released no such port: docs/methods.md).
    """

    name = "fastervlm"
    paper = ("Zhang, Cheng, Lu, Zhuo, Wang, Cao, Guo, She, Zhang. [CLS] Attention is All You Need for "
             "Training-Free Visual Token Pruning: Make VLM Inference Faster. arXiv:2412.01818v1 (2024)")
    stages = ("vision", "projector")
    default_site = "projector"
    signals = ("cls_attention",)
    no_cls_options = {"importance": "received_attention"}  # its variant for a tower without CLS (ours)

    importance: str = "cls_attention"

    def __post_init__(self):
        self.signals = importance_signals(self.name, self.importance, type(self).signals)

    def select(self, inputs: SiteInputs) -> Selection:
        att = inputs.signal(self.importance)
        return Selection(fastervlm_keep(att, inputs.keep).to(inputs.tokens.device))
