"""The learned token merger (stage 1 of tokensieve's two-stage pruner), as a registry method.

Between the vision tower and the projector (on Qwen-VL at ``llm.0``, after its patch merger), a
trained scorer picks M centre tokens and every token is softly assigned to the centres; the centres
become the assignment-weighted means (:class:`tokensieve.learned.TokenMerger`). M is the site's budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokensieve.errors import TokensieveError
from tokensieve.learned import MergeResult, TokenMerger
from tokensieve.learned.token_merger import GATE_SITES, VARIANTS
from tokensieve.method import Method, Selection, SiteInputs, register


@register
@dataclass
class LearnedTokenMerger(Method):
    """Merge the visual tokens into ``budget`` learned centres.

    module: the trained :class:`TokenMerger`; when absent, one is initialised from
    ``init_seed`` on first use (an untrained merger: usable, but no better than chance).
    While the module is in training mode the centres are drawn by Gumbel-top-k with
    temperature ``gumbel_tau``; in eval mode they are the top-``budget`` scores.
    diversity: > 0 spreads the centres over distinct tokens (greedy, penalising likeness to
    centres already picked); ``diversity_radius`` (patches) makes that penalty fade with distance
    on the patch grid in the deterministic choice (eval mode: validation and inference) only, as
    the Gumbel draws of training do better with the content-only penalty (docs/BENCHMARKS.md);
    null_logit: a fresh module's "assign to no centre" logit (None: every token is merged into
    some centre).
    gate: where the straight-through selection gate acts while training: ``"values"`` scales
    the centres by it; ``"keys"`` (``soft`` mode) weights them as attention keys in every LLM
    layer, so its gradient is how much attending to a centre helps rather than how much
    scaling it does (steadier on the shipped 8-layer testbed, worse on the previous 4-layer one:
    docs/BENCHMARKS.md).
    record: called with every forward's :class:`MergeResult` (the two-stage pruner's training
    hands its centre logits to the losses this way); None records nothing.
    """

    name = "token_merger"
    trained = True
    paper = "tokensieve two-stage pruning (learned merger; Gumbel-top-k centres, soft assignment)"
    stages = ("projector", "llm")  # llm: llm.0 on a backbone whose projector's grouping is fixed (Qwen-VL)
    default_site = "projector"

    variant: str = "simple"
    d_internal: int = 128
    num_heads: int = 4
    assign_tau: float = 1.0
    gumbel_tau: float = 1.0
    diversity: float = 0.0
    diversity_radius: float | None = None
    null_logit: float | None = None
    gate: str = "values"
    init_seed: int = 0
    module: TokenMerger | None = field(default=None, repr=False, compare=False, metadata={"state": True})
    record: Callable[[MergeResult], None] | None = field(default=None, repr=False, compare=False,
                                                         metadata={"state": True})

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise TokensieveError(f"unknown merger variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.gate not in GATE_SITES:
            raise TokensieveError(f"unknown merger gate {self.gate!r}; expected one of {', '.join(GATE_SITES)}")

    def build(self, d_vision: int, d_question: int | None) -> TokenMerger:
        """A fresh module for tokens of width ``d_vision`` (seeded, without touching the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            return TokenMerger(d_vision, self.d_internal, self.variant,
                               d_question if self.variant == "question_aware" else None, self.num_heads,
                               self.null_logit)

    def select(self, inputs: SiteInputs) -> Selection:
        question, valid = inputs.question() if self.variant == "question_aware" else (None, None)
        if self.module is None:
            self.module = self.build(inputs.tokens.shape[-1], None if question is None else question.shape[-1])
            self.module.to(inputs.tokens.device, inputs.tokens.dtype).eval()
        result = self.module(inputs.tokens, inputs.keep, question=question, question_mask=valid,
                             stochastic=self.module.training, gumbel_tau=self.gumbel_tau,
                             assign_tau=self.assign_tau, diversity=self.diversity,
                             diversity_radius=None if self.module.training else self.diversity_radius,
                             gate_values=not self.gates_keys)
        if self.record is not None:
            self.record(result)
        return Selection(result.indices, result.tokens, key_mask=result.gate if self.gates_keys else None)

    @property
    def gates_keys(self) -> bool:
        """True while training with the gate on the attention keys (inference needs no gate)."""
        return self.gate == "keys" and self.module is not None and self.module.training
