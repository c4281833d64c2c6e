"""The Qwen-VL chat format: the text a question about images is asked in, and the processor
inputs of a batch of such questions.

The text is what the families' chat templates give for one user turn (the images first, then
the question) followed by the assistant's cue. Qwen2-VL and Qwen2.5-VL's templates open with a
default system turn (:data:`DEFAULT_SYSTEM`); Qwen3-VL's do not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # the processor repeats <|image_pad|> per token
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"  # likewise <|video_pad|> (Qwen3-VL: per frame, timestamped)
DEFAULT_SYSTEM = {"qwen2_vl": "You are a helpful assistant.", "qwen2_5_vl": "You are a helpful assistant.",
                  "qwen3_vl": None}
# The assistant's cue that ends a prompt, once its special tokens are left out of the text.
ANSWER_CUE = re.compile(r"\s*assistant\s*$")


def prompt(question: str, kinds: Sequence[str] = ("image",), system: str | None = None) -> str:
    """One user turn with its visuals (``kinds``: each one's kind in order, ``"image"`` or ``"video"``) then
    ``question``, ending where the answer starts."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    placeholders = "".join(VIDEO if kind == "video" else IMAGE for kind in kinds)
    return f"{head}<|im_start|>user\n{placeholders}{question}<|im_end|>\n<|im_start|>assistant\n"


def encode(processor, samples: Sequence, system: str | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs of ``samples`` (anything with ``image`` and ``question``), each asked in
    :func:`prompt`: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` ``(B, L)`` padded on
    the tokenizer's side, ``pixel_values`` ``(sum_i t_i*h_i*w_i, 3*2*14*14)`` (the patches of every
    image, packed), ``image_grid_thw`` ``(n_images, 3)``."""
    return dict(processor(
        images=[s.image for s in samples], text=[prompt(s.question, ["image"], system) for s in samples],
        return_tensors="pt", padding=True,
    ))


def image_questions(tokenizer, input_ids: torch.Tensor, layout) -> list[str]:
    """Each visual unit's (image's or video's) question as text, in unit order over the batch: the text
    of its row after the row's last unit (``layout.question_mask``), without special tokens and the
    assistant's cue.

    input_ids: ``(B, L)``; layout: the adapter's ``QwenLayout`` (:mod:`.qwen_layout`) of them.
    """
    texts = [ANSWER_CUE.sub("", tokenizer.decode(ids[mask], skip_special_tokens=True)).strip()
             for ids, mask in zip(input_ids, layout.question_mask)]
    return [texts[b] for b, row in enumerate(layout.units) for _ in row]
