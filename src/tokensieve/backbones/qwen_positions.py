"""M-RoPE positions of a Qwen-VL prompt, kept by the tokens that stay.

Qwen-VL rotates every token by three position ids (t, h, w): text tokens count up on all three,
an image's tokens take their grid row and column. The ids are computed once on the full prompt
(the model's own ``get_rope_index``); when visual tokens are dropped before the LLM, the tokens
that stay keep theirs, so text after an image keeps its positions and generation continues from
the same ``max + 1`` as without pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """``(B, L)`` int: 0 text, 1 image placeholder, 2 video placeholder (the processor's
    ``mm_token_type_ids``)."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == image_token_id] = 1
    types[input_ids == video_token_id] = 2
    return types


def rope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   mm_token_type_ids: torch.Tensor, video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
    """``(3, B, L)`` t/h/w position ids of the full prompts (padding columns 0), from ``model``'s
    ``get_rope_index`` (a ``Qwen*VLModel``); ``image_grid_thw`` ``(n_images, 3)``, ``video_grid_thw``
    ``(n_videos, 3)``, ``second_per_grid_ts`` ``(n_videos,)`` (Qwen2.5-VL: seconds per temporal patch,
    which spaces a video's temporal ids; the other families' take it in ``**kwargs`` and ignore it)."""
    positions, _ = model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                        video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                        attention_mask=attention_mask)
    return positions


@dataclass
class KeptColumns:
    """The prompts shrunk to the columns that stay, re-padded on the left.

    input_ids, attention_mask: ``(B, L')``.
    position_ids: ``(4, B, L')``: the text row (``cumsum(mask) - 1``, what the layers and the
    causal mask read) over the three kept M-RoPE rows, the layout the model's ``generate`` builds.
    rope_deltas: ``(B, 1)`` next position minus the row's length, what the model adds to
    ``cumsum(mask) - 1`` when it builds the positions of later tokens itself.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rope_deltas: torch.Tensor


def keep_columns(input_ids: torch.Tensor, positions: torch.Tensor, stays: torch.Tensor, pad_id: int,
                 mask_dtype: torch.dtype) -> KeptColumns:
    """Gather the columns where ``stays`` ``(B, L)`` is True (real tokens that stay) from
    ``input_ids`` ``(B, L)`` and ``positions`` ``(3, B, L)``; rows are re-padded on the left."""
    rows = [input_ids[b][stays[b]] for b in range(input_ids.shape[0])]
    kept_positions = [positions[:, b][:, stays[b]] for b in range(input_ids.shape[0])]
    length = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r.new_full((length - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(length - len(r), dtype=mask_dtype, device=r.device),
                                   torch.ones(len(r), dtype=mask_dtype, device=r.device)]) for r in rows])
    rope = torch.stack([torch.cat([p.new_zeros(3, length - p.shape[1]), p], 1) for p in kept_positions], 1)
    text = (mask.long().cumsum(-1) - 1).clamp(min=0)
    deltas = torch.stack([p.max() + 1 - p.shape[1] if p.numel() else p.new_zeros(()) for p in kept_positions])
    return KeptColumns(ids, mask, torch.cat([text[None], rope]), deltas[:, None])
