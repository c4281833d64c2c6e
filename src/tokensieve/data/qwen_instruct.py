"""Training batches for the learned pruner on a Qwen-VL model: each example asked in the family's chat
format (:func:`tokensieve.backbones.qwen_prompt.prompt`), its answer and end of turn labelled.

One turn per example (the synthetic set's form); the answer is labelled by its own tokens, checked to
be the last tokens of the rendered text, so a tokenizer that would merge them with the prompt's end is
refused rather than mislabelled.
"""

from __future__ import annotations

import torch

from tokensieve.backbones.qwen_prompt import prompt
from tokensieve.data.instruct import IGNORE_INDEX, InstructExample
from tokensieve.errors import TokensieveError

END_OF_TURN = "<|im_end|>"


def collate_qwen(processor, examples: list[InstructExample], system: str | None = None,
                 label_eos: bool = True) -> dict[str, torch.Tensor]:
    """A training batch: ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)`` int64 padded on the
    tokenizer's side, ``pixel_values`` ``(sum_i t_i*h_i*w_i, 3*2*14*14)`` (every image's patches, packed)
    and ``image_grid_thw`` ``(B, 3)``. labels are ``-100`` except on each answer's tokens and its end of
    turn (``label_eos=False`` leaves the end of turn unlabelled), where they equal ``input_ids``.
    system: the family's default system turn (``QwenVLBackbone.system_prompt``)."""
    for e in examples:
        if len(e.turns) != 1:
            raise TokensieveError(f"example {e.id}: {len(e.turns)} turns; training on Qwen-VL takes one "
                                  "question and answer per example for now")
    texts = [prompt(e.turns[0][0], ["image"], system) + e.turns[0][1] + END_OF_TURN for e in examples]
    encoded = processor(images=[e.image for e in examples], text=texts, return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, e in enumerate(examples):
        answer = processor.tokenizer(e.turns[0][1] + END_OF_TURN, add_special_tokens=False)["input_ids"]
        end = int(mask[b].nonzero().max()) + 1  # the row's last real column, on either padding side
        if ids[b, end - len(answer): end].tolist() != answer:
            raise TokensieveError(f"example {e.id}: its answer tokenizes differently after the prompt than alone, "
                                  "so its labels cannot be placed")
        labelled = slice(end - len(answer), end if label_eos else end - 1)
        labels[b, labelled] = ids[b, labelled]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": encoded["pixel_values"], "image_grid_thw": encoded["image_grid_thw"]}
