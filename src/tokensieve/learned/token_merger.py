"""Stage 1 of the learned pruner: merge N vision-tower tokens into M centres before the projector.

A scorer gives every token an importance logit; Gumbel-top-k picks M centre tokens (plain
top-k at inference), optionally spread over distinct content (``diversity``); every token is
softly assigned to the centres, or to none (a learned "drop" option, ``null_logit``), and each
centre becomes the assignment-weighted mean of the tokens. A straight-through gate on the
centres carries the task gradient back into the scorer even though the choice is discrete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tokensieve.errors import TokensieveError
from tokensieve.learned.precision import cast_like
from tokensieve.ops import diverse_topk, gather_tokens

VARIANTS = ("simple", "question_aware")
# Where the straight-through selection gate acts: on the centres' values, or (soft mode) on
# their weight as attention keys in the LLM.
GATE_SITES = ("values", "keys")


def check_heads(d_internal: int, num_heads: int) -> None:
    """Raise unless ``num_heads`` attention heads can split ``d_internal`` channels."""
    if num_heads < 1 or d_internal % num_heads:
        raise TokensieveError(f"num_heads={num_heads} must be a positive divisor of d_internal={d_internal}")


class QuestionCrossAttention(nn.Module):
    """Tokens (queries) attend to the question (keys/values), with a residual, in ``d_internal`` channels.

    Shared by the question-aware merger and the layer pruner heads.
    """

    def __init__(self, d_tokens: int, d_question: int, d_internal: int, num_heads: int):
        super().__init__()
        check_heads(d_internal, num_heads)
        self.d_question = d_question
        self.token_proj = nn.Sequential(nn.LayerNorm(d_tokens), nn.Linear(d_tokens, d_internal))
        self.question_proj = nn.Sequential(nn.LayerNorm(d_question), nn.Linear(d_question, d_internal))
        self.attention = nn.MultiheadAttention(d_internal, num_heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, question: torch.Tensor,
                question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens ``(B, N, d_tokens)``; question ``(B, T, d_question)``; question_mask ``(B, T)``,
        True (or 1) = a real question token, None = all real. Returns ``(B, N, d_internal)``."""
        if question.dim() != 3 or question.shape[0] != tokens.shape[0] or question.shape[-1] != self.d_question:
            raise TokensieveError(f"question of shape {tuple(question.shape)} should be "
                                  f"(B={tokens.shape[0]}, T, d_question={self.d_question})")
        if question_mask is None:
            valid = torch.ones(question.shape[:2], dtype=torch.bool, device=question.device)
        else:
            if question_mask.shape != question.shape[:2]:
                raise TokensieveError(f"question_mask of shape {tuple(question_mask.shape)} should be "
                                      f"{tuple(question.shape[:2])}, one flag per question token")
            valid = question_mask.bool()
            # A row with no valid key would make every attention weight NaN.
            if not bool(valid.any(1).all()):
                raise TokensieveError("question_mask has a row with no valid question token")
        x = self.token_proj(tokens)
        q = self.question_proj(question)
        attended, _ = self.attention(x, q, q, key_padding_mask=~valid, need_weights=False)
        return x + attended


@dataclass
class MergeResult:
    """What :class:`TokenMerger` returns for a batch of ``B`` rows of ``N`` tokens merged into ``M``.

    tokens: ``(B, M, d_vision)`` the merged centres (times ``gate`` unless ``gate_values=False``),
        in the order of ``indices``, in the dtype of the input tokens (the rest in the merger's
        own weight dtype).
    indices: ``(B, M)`` ascending, unique indices of the centre tokens among the ``N``.
    assignment: ``(B, N, M)`` soft assignment of each token to the centres; rows sum to 1 (to
        at most 1 with a drop option: the rest of the token is dropped) and a centre token's row
        is one-hot on its own centre.
    logits: ``(B, N)`` importance logits (before any Gumbel noise).
    gate: ``(B, M)`` straight-through selection gate the centres were multiplied by: exactly 1
        in value, differentiable towards ``logits``.
    """

    tokens: torch.Tensor
    indices: torch.Tensor
    assignment: torch.Tensor
    logits: torch.Tensor
    gate: torch.Tensor


class TokenMerger(nn.Module):
    """Learned merge of ``N`` vision-tower tokens ``(B, N, d_vision)`` into ``M`` centres ``(B, M, d_vision)``.

    variant ``"simple"`` scores each token from itself; ``"question_aware"`` lets the tokens
    cross-attend to the question first (needs ``d_question``, the width of the question
    embeddings). ``d_question`` and ``num_heads`` are used only by ``"question_aware"``.
    null_logit: when set, every token may also go to no centre, with this learned assignment
    logit (initial value): a token unlike every centre is dropped instead of diluting one. A
    high start begins as plain pruning and lets training learn how much to merge.
    """

    def __init__(self, d_vision: int, d_internal: int = 128, variant: str = "simple",
                 d_question: int | None = None, num_heads: int = 4, null_logit: float | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise TokensieveError(f"unknown token merger variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.d_vision, self.d_internal, self.variant = d_vision, d_internal, variant
        if variant == "simple":
            self.scorer = nn.Sequential(nn.LayerNorm(d_vision), nn.Linear(d_vision, d_internal), nn.GELU(),
                                        nn.Linear(d_internal, 1))
        else:
            if d_question is None:
                raise TokensieveError("the question_aware token merger needs d_question, the width of the "
                                      "question embeddings")
            self.question_attention = QuestionCrossAttention(d_vision, d_question, d_internal, num_heads)
            self.scorer = nn.Sequential(nn.LayerNorm(d_internal), nn.Linear(d_internal, d_internal), nn.GELU(),
                                        nn.Linear(d_internal, 1))
        # Assignment compares tokens with centres in a learned space; the norm tames the
        # vision tower's large-magnitude outlier channels.
        self.assign_norm = nn.LayerNorm(d_vision)
        self.q_proj = nn.Linear(d_vision, d_internal)
        self.k_proj = nn.Linear(d_vision, d_internal)
        self.null_logit = None if null_logit is None else nn.Parameter(torch.tensor(float(null_logit)))

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[-1] != self.d_vision:
            raise TokensieveError(f"tokens of shape {tuple(tokens.shape)} should be (B, N, d_vision={self.d_vision})")

    def importance(self, tokens: torch.Tensor, question: torch.Tensor | None = None,
                   question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Importance logits ``(B, N)`` of tokens ``(B, N, d_vision)``.

        question ``(B, T, d_question)`` and question_mask ``(B, T)`` (True = real token) are
        required by ``"question_aware"`` (the mask may be None) and ignored by ``"simple"``.
        """
        self._check_tokens(tokens)
        if self.variant == "simple":
            return self.scorer(tokens).squeeze(-1)
        if question is None:
            raise TokensieveError("the question_aware token merger needs the question embeddings")
        return self.scorer(self.question_attention(tokens, question, question_mask)).squeeze(-1)

    def forward(self, tokens: torch.Tensor, n_centres: int, *, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None, stochastic: bool = False,
                gumbel_tau: float = 1.0, assign_tau: float = 1.0, diversity: float = 0.0,
                diversity_radius: float | None = None, gate_values: bool = True) -> MergeResult:
        """Merge tokens ``(B, N, d_vision)`` into ``n_centres`` centres; see :class:`MergeResult`.

        stochastic: Gumbel-top-k with noise from the global torch RNG (training); False picks
            the plain top-``n_centres`` logits (inference).
        diversity: 0 takes the top logits; more picks them greedily, each penalised by its
            likeness to centres already picked (:func:`tokensieve.ops.diverse_topk`), so a few
            salient regions cannot take every centre.
        diversity_radius: with ``diversity``, the penalty fades with distance on the patch grid
            (``N`` must be a square number of patches, in row-major order) over about this many
            patches, so it spreads the centres over objects, not only over kinds of content
            (a centre scored below the mean, background, keeps the penalty at any distance).
        gumbel_tau: temperature of the relaxed selection behind the straight-through gradient.
        assign_tau: temperature of the soft assignment (smaller = closer to hard).
        gate_values: multiply the centres by ``gate``; False leaves them ungated, for a caller
            that applies the gate elsewhere (as an attention-key weight in the LLM).
        """
        self._check_tokens(tokens)
        b, n, _ = tokens.shape
        m = n_centres
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
            raise TokensieveError(f"n_centres={n_centres} must be between 1 and the {n} tokens per row")
        if gumbel_tau <= 0 or assign_tau <= 0:
            raise TokensieveError(f"temperatures must be positive (gumbel_tau={gumbel_tau}, assign_tau={assign_tau})")

        caller_dtype = tokens.dtype
        tokens, question = cast_like(self, tokens), cast_like(self, question)
        logits = self.importance(tokens, question, question_mask)
        perturbed = logits
        if stochastic:
            # Same draw as F.gumbel_softmax, from the global RNG so a saved RNG state replays it.
            perturbed = logits - torch.empty_like(logits).exponential_().log()
        if diversity < 0:
            raise TokensieveError(f"diversity={diversity} must be >= 0")
        if diversity_radius is not None and (diversity_radius <= 0 or math.isqrt(n) ** 2 != n):
            raise TokensieveError(f"diversity_radius={diversity_radius} needs a positive radius and the {n} tokens "
                                  "on a square patch grid (the full grid, before any other stage removes tokens)")
        indices = diverse_topk(perturbed.detach(), tokens.detach(), m, diversity, diversity_radius)

        # Straight-through choice: hard 0/1 forward, gradient of a sigmoid around the cut-off
        # between the lowest picked and the highest unpicked logit (for plain top-k, between
        # the m-th and the (m+1)-th). The threshold is a constant, so each logit's gradient
        # says "move across the cut".
        hard = torch.zeros_like(logits).scatter(1, indices, 1.0)
        if m < n:
            picked = perturbed.detach()
            threshold = (picked.masked_fill(hard == 0, math.inf).amin(1, keepdim=True)
                         + picked.masked_fill(hard == 1, -math.inf).amax(1, keepdim=True)) / 2
        else:
            # Every token is selected for certain: gate exactly 1, no gradient.
            threshold = torch.full_like(logits[:, :1], -math.inf)
        relaxed = torch.sigmoid((perturbed - threshold) / gumbel_tau)
        # Bracketed so the forward value is exactly the hard one (h + s - s can round).
        gate = (hard + (relaxed - relaxed.detach())).gather(1, indices)

        normed = self.assign_norm(tokens)
        q = self.q_proj(normed)
        k = self.k_proj(gather_tokens(normed, indices))
        affinity = q @ k.transpose(1, 2) / (math.sqrt(self.d_internal) * assign_tau)  # (B, N, M)
        if self.null_logit is None:
            soft = affinity.softmax(-1)
        else:  # a last column for "no centre", dropped after the softmax
            null = self.null_logit.to(affinity.dtype).expand(b, n, 1)
            soft = torch.cat([affinity, null], -1).softmax(-1)[..., :m]
        # Each centre token belongs to its own centre only, so no centre loses its own content
        # and every centre's weight is >= 1 (the mean is defined even when M == N).
        own = torch.eye(m, dtype=soft.dtype, device=soft.device).expand(b, m, m)
        assignment = soft.scatter(1, indices[..., None].expand(b, m, m), own)

        centres = assignment.transpose(1, 2) @ tokens / assignment.sum(1)[..., None]
        if gate_values:
            centres = centres * gate[..., None]
        return MergeResult(centres.to(caller_dtype), indices, assignment, logits, gate)
