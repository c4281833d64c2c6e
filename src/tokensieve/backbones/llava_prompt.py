"""LLaVA-1.5's chat format: the text a question about an image is asked in, and the
processor inputs of a batch of such questions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaProcessor

# The first turn: the image comes before the question.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
# Turns after the first: the same without the image.
LATER_TURN_TEMPLATE = "USER: {question} ASSISTANT:"


def prompt(question: str) -> str:
    """The first turn asking ``question``, ending where the assistant's answer starts."""
    return PROMPT_TEMPLATE.format(question=question)


def encode(processor: LlavaProcessor, samples: Sequence) -> dict[str, torch.Tensor]:
    """Processor inputs of ``samples`` (anything with ``image`` and ``question``), each asked
    in :func:`prompt`: ``input_ids``, ``attention_mask`` ``(B, L)`` padded on the tokenizer's
    side (left for the testbed), ``pixel_values`` ``(B, 3, H, W)``."""
    return dict(processor(
        images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
        return_tensors="pt", padding=True,
    ))
