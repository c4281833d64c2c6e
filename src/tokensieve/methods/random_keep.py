"""Random pruning: the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.method import Method, Selection, SiteInputs, register


@register
@dataclass
class RandomKeep(Method):
    """Keep a uniformly random subset of the tokens, drawn per sample.

    Each row draws from its own generator (seeded by the attach seed and the row's content),
    so a sample keeps the same tokens alone or in a batch.
    """

    name = "random"
    paper = "baseline used throughout the token-pruning literature"
    default_site = "projector"
    handles_video = True  # a uniform draw over the tokens, whatever their grid

    def select(self, inputs: SiteInputs) -> Selection:
        n = inputs.tokens.shape[1]
        rows = [torch.randperm(n, generator=g)[: inputs.keep] for g in inputs.generators()]
        return Selection(torch.stack(rows).sort(1).values.to(inputs.tokens.device))
