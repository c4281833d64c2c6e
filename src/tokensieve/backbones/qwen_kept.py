"""What a choice of kept visual tokens does on Qwen-VL: the check of the adapter's ``kept=`` lists,
the tower output cut to them, and where each row's remaining visual tokens came from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from tokensieve.backbones.kept_indices import checked_indices
from tokensieve.backbones.qwen_layout import QwenLayout
from tokensieve.errors import TokensieveError


def checked_kept(kept: Sequence, counts: list[int], kinds: list[str]) -> list[torch.Tensor]:
    """``kept`` as one ``(M_u,)`` index tensor per visual unit (``kinds``: ``"image"`` or ``"video"`` each,
    prompt order over the batch), each increasing and in ``[0, N_u)``."""
    if len(kept) != len(counts):
        held = "images" if set(kinds) <= {"image"} else "images and videos"
        raise TokensieveError(f"kept has {len(kept)} entries for the {len(counts)} {held} of the batch "
                              "(one index list per image or video, in prompt order)")
    return [checked_indices(k, n, f"kept {kind} {i}") for i, (k, n, kind) in enumerate(zip(kept, counts, kinds))]


def kept_per_run(layout: QwenLayout, kept: list[torch.Tensor]) -> list[list[int]]:
    """Per row and run of ``layout``, how many of its unit's ``kept`` ``(M_u,)`` (increasing) indices fall in it.
    A unit of one run keeps them all, known from the shape; the runs of units spanning several (a Qwen3-VL
    video's temporal patches) are counted in one read of values for the whole batch."""
    spans = Counter(run.unit for row in layout.runs for run in row)
    shared = [run for row in layout.runs for run in row if spans[run.unit] > 1]
    ends = [torch.tensor([run.offset, run.offset + run.count], device=kept[run.unit].device) for run in shared]
    counted = iter(torch.stack([torch.searchsorted(kept[run.unit], edges).diff()[0]
                                for run, edges in zip(shared, ends)]).tolist() if shared else [])
    return [[next(counted) if spans[run.unit] > 1 else len(kept[run.unit]) for run in row] for row in layout.runs]


def row_origins(units: list[list[int]], counts: list[int], kept: list[torch.Tensor] | None,
                device) -> list[torch.Tensor]:
    """Per row ``(n_b,)``: each visual token entering the LLM as an index among the row's visual tokens
    before pruning (its units in prompt order), after ``kept`` (per unit) if given. units: per row its
    visual units (``QwenLayout.units``); counts: each unit's token count."""
    origins = []
    for row in units:
        offsets = [sum(counts[u] for u in row[:i]) for i in range(len(row))]
        parts = [o + (torch.arange(counts[u], device=device) if kept is None else kept[u].to(device))
                 for o, u in zip(offsets, row)]
        origins.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device))
    return origins


def kept_features(features, kept: list[torch.Tensor], values: list[torch.Tensor | None] | None = None):
    """The tower output with each unit's tokens (and, Qwen3, each DeepStack level's) cut to ``kept``;
    ``values``: per unit ``(M_u, d)`` new contents of its kept tokens, or None to keep theirs (the
    DeepStack levels are always cut, never replaced)."""
    values = values or [None] * len(kept)
    fields = {"pooler_output": tuple(f[k.to(f.device)] if v is None else v.to(f.dtype)
                                     for f, k, v in zip(features.pooler_output, kept, values))}
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack is not None:
        fields["deepstack_features"] = [tuple(f[k.to(f.device)] for f, k in zip(level, kept)) for level in deepstack]
    return type(features)(**fields)
