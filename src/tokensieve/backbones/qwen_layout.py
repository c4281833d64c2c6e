"""Where the visual tokens of a Qwen-VL batch sit, and what the model receives after the kept tokens are chosen."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisualRun:
    """One image's placeholder run: ``count`` columns from ``start`` (in the padded row), holding
    image ``image`` (its index in ``image_grid_thw``, prompt order over the batch)."""

    start: int
    count: int
    image: int


@dataclass
class QwenLayout:
    """Where things sit in a batch of prompts.

    runs: per row, its images' placeholder runs in prompt order (a row may have none).
    question_mask: ``(B, L)`` True on real tokens after the row's last image.
    """

    runs: list[list[VisualRun]]
    question_mask: torch.Tensor

    @property
    def n_images(self) -> int:
        return sum(len(row) for row in self.runs)


@dataclass
class QwenInputs:
    """What the model receives: ``input_ids``, ``attention_mask`` ``(B, L')``, ``position_ids``
    ``(4, B, L')`` (text row over t/h/w), ``image_features`` the tower output whose
    ``pooler_output`` holds one ``(M_i, d)`` per image (Qwen3: ``deepstack_features`` one such
    tuple per level), ``M_i`` = tokens kept of image ``i``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_features: object

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "mm_encoder_outputs": {"image": self.image_features}}


def find_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> QwenLayout:
    """The image runs (runs of ``image_token_id``) and question tokens of each row of ``input_ids`` ``(B, L)``."""
    is_image = (input_ids == image_token_id) & attention_mask.bool()
    edges = torch.diff(is_image.int(), dim=1, prepend=is_image.new_zeros(is_image.shape[0], 1).int(),
                       append=is_image.new_zeros(is_image.shape[0], 1).int())
    runs, image = [], 0
    question = attention_mask.bool().clone()
    for b in range(input_ids.shape[0]):
        starts = (edges[b] == 1).nonzero().flatten().tolist()
        ends = (edges[b] == -1).nonzero().flatten().tolist()
        runs.append([VisualRun(s, e - s, image + i) for i, (s, e) in enumerate(zip(starts, ends))])
        image += len(starts)
        if ends:
            question[b, : ends[-1]] = False
    return QwenLayout(runs, question)
