"""The check every adapter's ``kept=`` argument gets: index lists of the visual tokens that stay."""

from __future__ import annotations

import torch

from tokensieve.errors import TokensieveError


def checked_indices(indices, n_tokens: int, label: str) -> torch.Tensor:
    """``indices`` as a ``(M,)`` integer tensor, refused unless it holds increasing (sorted,
    distinct) integers in ``[0, n_tokens)``; ``label`` starts each message (``kept row 2``)."""
    row = torch.as_tensor(indices)
    if row.dim() != 1 or row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
        raise TokensieveError(f"{label}: expected a 1-D tensor of token indices, got a "
                              f"{tuple(row.shape)} {row.dtype} tensor")
    outside = row[(row < 0) | (row >= n_tokens)]
    if outside.numel():
        raise TokensieveError(f"{label}: index {int(outside[0])} is outside the {n_tokens} visual tokens "
                              f"(0 .. {n_tokens - 1})")
    unordered = (row[1:] <= row[:-1]).nonzero()
    if unordered.numel():
        i = int(unordered[0])
        raise TokensieveError(f"{label}: indices must increase, each once (sorted, no repeats); "
                              f"{int(row[i + 1])} follows {int(row[i])}")
    return row
