"""LLaVA-OneVision's chat format (its Qwen2 LLM's ``<|im_start|>`` turns): the text a question about an image
or a video is asked in, and the processor inputs of a batch of such questions.

One user turn, the visual placeholder (``<image>`` or ``<video>``, which the processor repeats per visual
token) on its own line before the question, then the assistant's cue: what the llava-hf OneVision chat
template gives for one image or video and a text (no system turn).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

PLACEHOLDER = {"image": "<image>", "video": "<video>"}
# The assistant's cue that ends a prompt, once its special tokens are left out of the text.
ANSWER_CUE = re.compile(r"\s*assistant\s*$")


def prompt(question: str, kind: str = "image") -> str:
    """One user turn with one ``kind`` (``"image"`` or ``"video"``) then ``question``, ending where the answer
    starts."""
    return f"<|im_start|>user\n{PLACEHOLDER[kind]}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def encode(processor, samples: Sequence) -> dict[str, torch.Tensor]:
    """Processor inputs of ``samples`` (anything with ``image`` and ``question``), each asked in
    :func:`prompt`: ``input_ids``, ``attention_mask`` ``(B, L)`` padded on the tokenizer's side,
    ``pixel_values`` ``(B, max_crops, 3, S, S)``, ``image_sizes`` ``(B, 2)``."""
    return dict(processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                          return_tensors="pt", padding=True))
