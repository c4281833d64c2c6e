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

from tokensieve.ops import trues_first


def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """``(B, L)`` int: 0 text, 1 image placeholder, 2 video placeholder (the processor's
    ``mm_token_type_ids``)."""
    types = torch.where(input_ids == video_token_id, 2, 0)  # not a bool-mask write, which reads the mask
    return torch.where(input_ids == image_token_id, 1, types).int()


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


def keep_columns(input_ids: torch.Tensor, positions: torch.Tensor, stays: torch.Tensor, counts: list[int],
                 pad_id: int, mask_dtype: torch.dtype) -> KeptColumns:
    """Gather the columns where ``stays`` ``(B, L)`` is True (real tokens that stay) from ``input_ids``
    ``(B, L)`` and ``positions`` ``(3, B, L)``; rows are re-padded on the left. counts: per row how many
    columns stay, known on the host (its real tokens less the dropped ones), so that no value is read back:
    a row's staying columns are the first ``count`` of a stable sort that puts them first."""
    length = max(counts, default=0)
    stayed = torch.tensor(counts, device=input_ids.device)  # (B,)
    slot = torch.arange(length, device=input_ids.device) - (length - stayed)[:, None]  # (B, L') among the row's
    padding = slot < 0  # staying columns; below 0: its padding
    source = trues_first(stays).gather(1, slot.clamp(min=0))  # (B, L') the column each slot takes
    ids = input_ids.gather(1, source).masked_fill(padding, pad_id)
    mask = (~padding).to(mask_dtype)
    rope = positions.gather(2, source.expand(3, -1, -1)).masked_fill(padding, 0)  # (3, B, L')
    text = (mask.long().cumsum(-1) - 1).clamp(min=0)
    top = rope.masked_fill(padding, torch.iinfo(rope.dtype).min).amax(dim=(0, 2))  # (B,) a row's last position
    deltas = torch.where(stayed > 0, top + 1 - stayed, 0)
    return KeptColumns(ids, mask, torch.cat([text[None], rope]), deltas[:, None])
