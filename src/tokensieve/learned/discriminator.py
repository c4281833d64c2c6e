"""Adversarial critic for the learned pruner: tells hidden states of the unpruned model from pruned ones."""

from __future__ import annotations

import torch
from torch import nn

from tokensieve.errors import TokensieveError
from tokensieve.learned.precision import cast_like


class HiddenStateDiscriminator(nn.Module):
    """One logit per row (``> 0`` = looks unpruned, the "real" class) from ``n_states`` hidden states.

    Each state ``(B, L, d_model)`` (e.g. decoder layers -1/-3/-5) is mean-pooled over the masked
    positions, normalised, and the ``n_states`` vectors are concatenated into an MLP.
    """

    def __init__(self, d_model: int, n_states: int = 3, d_internal: int = 128):
        super().__init__()
        if n_states < 1:
            raise TokensieveError(f"n_states={n_states}: the discriminator needs at least one hidden state")
        self.d_model, self.n_states = d_model, n_states
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_states))
        self.mlp = nn.Sequential(nn.Linear(n_states * d_model, d_internal), nn.GELU(), nn.Linear(d_internal, 1))

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """states: ``n_states`` tensors ``(B, L, d_model)``; mask ``(B, L)`` bool, True = pool this
        position. Returns logits ``(B,)``."""
        if len(states) != self.n_states:
            raise TokensieveError(f"the discriminator was built for {self.n_states} hidden states, got {len(states)}")
        if mask.dim() != 2:
            raise TokensieveError(f"mask of shape {tuple(mask.shape)} should be (B, L)")
        for s in states:
            if s.shape != (*mask.shape, self.d_model):
                raise TokensieveError(f"hidden state of shape {tuple(s.shape)} should be "
                                      f"{(*mask.shape, self.d_model)} to match the mask and d_model")
        mask, states = mask.bool(), [cast_like(self, s) for s in states]
        count = mask.sum(1, keepdim=True)
        if not bool((count > 0).all()):
            raise TokensieveError("the discriminator mask selects no position in some row")
        # where(), not multiplication, so masked positions are ignored even if they hold inf/NaN.
        pooled = [norm(torch.where(mask[..., None], s, 0).sum(1) / count.to(s.dtype))
                  for norm, s in zip(self.norms, states)]
        return self.mlp(torch.cat(pooled, -1)).squeeze(-1)

    def reinitialise(self) -> None:
        """Draw every parameter afresh (as at construction), e.g. for a random critic reset during training."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
