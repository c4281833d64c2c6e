"""PyramidDrop: drop image tokens in stages inside the LLM, each keeping a share of the last.

As released for LLaVA-1.5 (Cooperx521/PyramidDrop@6444f30, llava/model/modeling_llama_pdrop.py,
``pdrop_forward`` and ``pdrop_rank_drop``): the LLM is split into four stages at layers 8, 16
and 24 of 32; entering each, the image tokens are ranked by the attention the last prompt token
pays them, computed with that layer's own norm and q/k (RoPE at the current positions, softmax
in float32 over every key, mean over heads), and the top ``int(n * lambda)`` stay, in image
order (lambda = 0.5: 576 -> 288 -> 144 -> 72, 270 tokens on average over the layers). Text is
never touched, positions are renumbered without gaps after each drop, and nothing is dropped
while decoding (a new token's position follows the shorter prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, Method, Selection, SiteInputs, register
from tokensieve.methods.llm_schedule import (
    checked_layers,
    checked_positions,
    stage_layers,
)
from tokensieve.ops import topk_sorted


def pyramid_layers(depth: int) -> tuple[int, ...]:
    """The paper's stage layers for an LLM of ``depth`` layers: a quarter, half and three quarters
    of the way (8, 16, 24 of LLaVA-1.5's 32)."""
    return tuple(depth * i // 4 for i in (1, 2, 3))


def pyramiddrop_keep(attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` image tokens of highest ``attention`` ``(B, N)`` (the last prompt token's, at the
    stage's own layer), ascending ``(B, keep)``; ties as ``torch.topk`` breaks them, as released."""
    return topk_sorted(attention, keep)


@register
@dataclass
class PyramidDrop(Method):
    """PyramidDrop: several stages inside the LLM, each keeping ``lambda`` of the image tokens before it.

    The budget is lambda, the share each stage keeps (``0.5``, the paper's), counted down as the
    released code does (``int()``). layers: the stage layers (default: a quarter, half and three
    quarters of the LLM's depth, the paper's 8/16/24 of 32). positions: ``"renumbered"`` (the
    paper's: positions close the gaps after a drop) or ``"original"`` (ours: kept tokens keep
    their positions, as every other method here). Signal: ``layer_text_attention``.
    """

    name = "pyramiddrop"
    paper = ("Xing, Huang, Cao, Qian, Chen, Wang, Liu, Zhang, Wang, Lin. PyramidDrop: Accelerating Your "
             "Large Vision-Language Models via Pyramid Visual Redundancy Reduction. CVPR 2025. arXiv:2410.17247")
    stages = ("llm",)
    default_site = "llm"  # placed by its layers, not one site
    handles_video = True  # the text's attention rank over the tokens, no grid assumed
    signals = ("layer_text_attention",)
    budget_is_share = True

    layers: tuple[int, ...] | None = None
    positions: str = "renumbered"

    def __post_init__(self):
        checked_positions(self.name, self.positions)
        self.layers = checked_layers(self.name, self.layers)

    @property
    def renumbers_positions(self) -> bool:
        return self.positions == "renumbered"

    def schedule(self, site: str, budget: Budget, depth: int | None = None) -> list[tuple[str, Budget]]:
        if budget.ratio is None:
            raise TokensieveError(f"pyramiddrop's budget is lambda, the share each stage keeps of the tokens "
                                  f"before it (the paper's 0.5), not a count ({budget.count})")
        layers = stage_layers(self.name, self.layers, pyramid_layers, site, depth)
        share = Budget(ratio=budget.ratio, rounding="down")
        return [(f"llm.{k}", share) for k in layers]

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if site == "llm.0":
            raise TokensieveError("pyramiddrop ranks at a layer of the LLM (llm.k, k >= 1), not llm.0")

    def select(self, inputs: SiteInputs) -> Selection:
        return Selection(pyramiddrop_keep(inputs.signal("layer_text_attention"), inputs.keep))
