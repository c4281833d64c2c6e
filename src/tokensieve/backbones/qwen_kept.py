"""What a choice of kept visual tokens does on Qwen-VL: the check of the adapter's ``kept=`` lists,
the tower output cut to them, and where each row's remaining visual tokens came from."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokensieve.backbones.kept_indices import checked_indices
from tokensieve.errors import TokensieveError


def checked_kept(kept: Sequence, counts: list[int]) -> list[torch.Tensor]:
    """``kept`` as one ``(M_i,)`` index tensor per image, each increasing and in ``[0, N_i)``."""
    if len(kept) != len(counts):
        raise TokensieveError(f"kept has {len(kept)} entries for the {len(counts)} images of the batch "
                              "(one index list per image)")
    return [checked_indices(k, n, f"kept image {i}") for i, (k, n) in enumerate(zip(kept, counts))]


def row_origins(runs: list, counts: list[int], kept: list[torch.Tensor] | None, device) -> list[torch.Tensor]:
    """Per row ``(n_b,)``: each visual token entering the LLM as an index among the row's visual tokens
    before pruning (its images in prompt order), after ``kept`` (per image) if given. runs: per row
    its images' placeholder runs (``QwenLayout.runs``); counts: each image's token count."""
    origins = []
    for row in runs:
        offsets = [sum(counts[r.image] for r in row[:i]) for i in range(len(row))]
        parts = [o + (torch.arange(counts[r.image], device=device) if kept is None else kept[r.image].to(device))
                 for o, r in zip(offsets, row)]
        origins.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device))
    return origins


def kept_features(features, kept: list[torch.Tensor], values: list[torch.Tensor | None] | None = None):
    """The tower output with each image's tokens (and, Qwen3, each DeepStack level's) cut to ``kept``;
    ``values``: per image ``(M_i, d)`` new contents of its kept tokens, or None to keep theirs (the
    DeepStack levels are always cut, never replaced)."""
    values = values or [None] * len(kept)
    fields = {"pooler_output": tuple(f[k.to(f.device)] if v is None else v.to(f.dtype)
                                     for f, k, v in zip(features.pooler_output, kept, values))}
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack is not None:
        fields["deepstack_features"] = [tuple(f[k.to(f.device)] for f, k in zip(level, kept)) for level in deepstack]
    return type(features)(**fields)
