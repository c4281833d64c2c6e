"""The prompt a backbone's model is asked a question about images in, and the processor inputs of
a batch of such questions: LLaVA-1.5's format (:mod:`.llava_prompt`), the Qwen-VL chat format
(:mod:`.qwen_prompt`, with the family's default system turn), LLaVA-OneVision's (:mod:`.onevision_prompt`)
or LLaVA-NeXT's (and NeXT-Video's): its checkpoint's own chat template where the processor has one (llava-hf's v1.6
checkpoints: Vicuna's ``USER: ... ASSISTANT:`` with its system line, Mistral's ``[INST] ... [/INST]``),
else LLaVA-1.5's format, which is the Vicuna one without the system line."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokensieve.backbones.load import is_next, is_onevision, is_qwen
from tokensieve.errors import TokensieveError


def prompt_text(backbone, question: str, visuals: int | Sequence[str] = 1) -> str:
    """``question`` after its visuals' placeholders, ending where the answer starts (the processor expands
    each placeholder into the visual's tokens). visuals: how many images, or each one's kind in order,
    ``"image"`` or ``"video"`` (a video on the families that take one: Qwen-VL, OneVision, NeXT-Video)."""
    kinds = ["image"] * visuals if isinstance(visuals, int) else list(visuals)
    family = getattr(backbone, "family_name", "LLaVA")
    if isinstance(visuals, str) or not set(kinds) <= {"image", "video"}:
        raise TokensieveError(f"visuals {visuals!r}: give how many images, or each visual's kind in order "
                              "(\"image\" or \"video\")")
    if "video" in kinds and not (is_qwen(backbone) or getattr(backbone, "takes_video", False)):
        raise TokensieveError(f"the {family} backbone takes images only, not a video")
    if is_qwen(backbone):
        from tokensieve.backbones.qwen_prompt import prompt

        return prompt(question, kinds, backbone.system_prompt)
    if len(kinds) != 1:
        raise TokensieveError(f"the {family} backbone takes exactly one image or video per prompt, not {len(kinds)}")
    kind = kinds[0]
    if is_onevision(backbone):
        from tokensieve.backbones.onevision_prompt import prompt

        return prompt(question, kind)
    template = getattr(backbone.processor, "chat_template", None) if is_next(backbone) else None
    if template:  # one user turn: the image or video, then the question, and the assistant's cue
        turn = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        return backbone.processor.apply_chat_template(turn, add_generation_prompt=True)
    from tokensieve.backbones.llava_prompt import prompt

    return prompt(question).replace("<image>", "<video>") if kind == "video" else prompt(question)


def encode_samples(backbone, samples: Sequence) -> dict[str, torch.Tensor]:
    """Processor inputs of ``samples`` (anything with ``image`` and ``question``), one image each,
    padded on the tokenizer's side: LLaVA ``input_ids``, ``attention_mask`` ``(B, L)``,
    ``pixel_values`` ``(B, 3, H, W)``; Qwen-VL also ``mm_token_type_ids`` ``(B, L)``, and
    ``pixel_values`` ``(sum_i patches_i, 3*2*14*14)`` with ``image_grid_thw`` ``(B, 3)``."""
    if is_qwen(backbone):
        from tokensieve.backbones.qwen_prompt import encode

        return encode(backbone.processor, samples, backbone.system_prompt)
    if is_onevision(backbone):
        from tokensieve.backbones.onevision_prompt import encode

        return encode(backbone.processor, samples)
    if is_next(backbone):  # pixel_values (B, max_crops, 3, S, S), image_sizes (B, 2)
        return dict(backbone.processor(images=[s.image for s in samples],
                                       text=[prompt_text(backbone, s.question) for s in samples],
                                       return_tensors="pt", padding=True))
    from tokensieve.backbones.llava_prompt import encode

    return encode(backbone.processor, samples)
