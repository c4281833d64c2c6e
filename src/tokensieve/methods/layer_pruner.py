"""The learned layer pruner (stage 2 of tokensieve's two-stage pruner), as a registry method.

Before an LLM decoder layer, a trained head cross-attends from each visual token's hidden
state to the question and gives keep/drop logits (:class:`tokensieve.learned.LayerPrunerHead`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokensieve.errors import TokensieveError
from tokensieve.learned import LayerPrunerHead, inference_keep, training_keep_mask
from tokensieve.method import Method, Selection, SiteInputs, register


@register
@dataclass
class LearnedLayerPruner(Method):
    """Keep the visual tokens a trained head scores highest for the question.

    In eval mode: the top-``budget`` tokens by keep probability (static shapes, ``hard`` mode
    removes the rest), or with ``threshold`` t the tokens with keep probability > t, at most
    ``budget`` and at least one per row (a count per row: the head decides how many the
    question needs; see :func:`tokensieve.learned.inference_keep`). In training mode
    (``soft`` mode, budget 1.0): every token stays and a hard Gumbel-softmax mask with
    temperature ``tau`` (straight-through) weights it as an attention key, so the head learns
    from the loss. module: the trained head; when absent one is initialised from
    ``init_seed`` on first use. record: called with every forward's keep/drop logits ``(B, N, 2)``
    (the two-stage pruner's training hands them to its sparsity loss this way); None records nothing.
    """

    name = "layer_pruner"
    trained = True
    paper = "tokensieve two-stage pruning (learned pruner heads; hard Gumbel-softmax keep masks)"
    stages = ("llm",)
    default_site = "llm.1"

    d_internal: int = 128
    num_heads: int = 4
    init_keep_bias: float = 2.0
    tau: float = 1.0
    threshold: float | None = None
    init_seed: int = 0
    module: LayerPrunerHead | None = field(default=None, repr=False, compare=False, metadata={"state": True})
    record: Callable[[torch.Tensor], None] | None = field(default=None, repr=False, compare=False,
                                                          metadata={"state": True})

    def build(self, d_model: int) -> LayerPrunerHead:
        """A fresh head for hidden states of width ``d_model`` (seeded, global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            return LayerPrunerHead(d_model, self.d_internal, self.num_heads, init_keep_bias=self.init_keep_bias)

    @property
    def count_per_row(self) -> bool:
        return self.threshold is not None

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if self.threshold is not None and not 0 <= self.threshold < 1:
            raise TokensieveError(f"layer_pruner threshold={self.threshold} must be in [0, 1)")

    def select(self, inputs: SiteInputs) -> Selection:
        question, question_valid = inputs.question()
        if self.module is None:
            self.module = self.build(inputs.tokens.shape[-1]).to(inputs.tokens.device, inputs.tokens.dtype).eval()
        logits = self.module(inputs.tokens, question, question_valid)  # (B, N, 2)
        if self.record is not None:
            self.record(logits)
        b, n = logits.shape[:2]
        if self.module.training:
            if inputs.keep != n:
                raise TokensieveError(f"layer_pruner at {inputs.site} is training: give it budget 1.0 "
                                      "(its Gumbel mask decides what stays)")
            everything = torch.arange(n, device=logits.device).expand(b, n)
            return Selection(everything, key_mask=training_keep_mask(logits, self.tau))
        indices, real = inference_keep(logits, inputs.keep, self.threshold, inputs.valid)
        return Selection(indices, valid=real)
