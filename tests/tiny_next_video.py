"""A tiny random LLaVA-NeXT-Video model with an offline processor, for tests (docs/notes/llava-next-study.md).

:func:`save_tiny_next_video` builds it from the tiny LLaVA-NeXT's parts (:mod:`tiny_llava_next`: CLIP 28-px
crops of 7-px patches, 4x4 = 16 tokens per crop and a CLS token; a 3-layer Llama 32 wide; pinpoints 28x56,
56x28, 56x56; its tokenizer with ``<video>`` added) and saves model and processor with ``save_pretrained``. Its
images take the tiny NeXT's runs (:data:`tiny_llava_next.TOKENS`); a video of 4 frames of 28x28 gives 4 x 2x2
tokens (each frame's 4x4 grid average-pooled before the projector) and no newline (16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from random_media import random_image, random_video, seed_of
from tiny_llava_next import (
    IMAGE_SIZES,
    PINPOINTS,
    image_processor,
    tokenizer,
    tower_and_llm,
)
from tiny_llava_next import VOCAB as NEXT_VOCAB

import tokensieve  # noqa: F401  (its torchvision shim must come before transformers)
from tokensieve.backbones.llava_prompt import prompt

# isort: split
from transformers import (
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
)

VOCAB = {**NEXT_VOCAB, "<video>": len(NEXT_VOCAB)}
VIDEO_SHAPE = (4, 28, 28)  # (frames, height, width) -> 4 x 2x2 pooled tokens, no newline

# One image or video per row: a video beside two aspect ratios, questions of different lengths.
ROWS = [("what is the colour ?", "wide"), ("what shape is left and right ?", "video"), ("what colour ?", "tall")]


def config() -> LlavaNextVideoConfig:
    vision, text = tower_and_llm(VOCAB)
    return LlavaNextVideoConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                image_grid_pinpoints=PINPOINTS, image_token_index=VOCAB["<image>"],
                                video_token_index=VOCAB["<video>"])


def processor() -> LlavaNextVideoProcessor:
    """The offline processor: 28-px crops and frames, CLS dropped (``default``)."""
    videos = LlavaNextVideoVideoProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaNextVideoProcessor(video_processor=videos, image_processor=image_processor(),
                                   tokenizer=tokenizer(VOCAB), patch_size=7, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)


def save_tiny_next_video(folder: Path, seed: int = 0) -> Path:
    """The random tiny model and its processor, saved in ``folder``."""
    torch.manual_seed(seed)
    LlavaNextVideoForConditionalGeneration(config()).save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


def image(size: str, seed: int = 0) -> Image.Image:
    """A random RGB image of :data:`tiny_llava_next.IMAGE_SIZES` ``size``."""
    return random_image(*IMAGE_SIZES[size], seed)


def video(frames: int = VIDEO_SHAPE[0], seed: int = 0) -> np.ndarray:
    """A random video of ``frames`` 28x28 frames: ``(frames, height, width, 3)`` uint8."""
    return random_video(frames, *VIDEO_SHAPE[1:], seed)


def inputs(processor, rows, first: int | list[int] = 0, frames: int = VIDEO_SHAPE[0]) -> dict:
    """Processor inputs of ``rows`` ``(question, image size or "video")``, left-padded; row ``b``'s image is
    ``image(size, seed=first + b)``, its video ``video(frames, seed=first + b)`` (``first``: a row's index in its
    list, to ask it alone; a list: each row's seed)."""
    images = [image(v, seed=seed_of(first, b)) for b, (_, v) in enumerate(rows) if v != "video"]
    videos = [video(frames, seed=seed_of(first, b)) for b, (_, v) in enumerate(rows) if v == "video"]
    texts = [prompt(q).replace("<image>", "<video>") if v == "video" else prompt(q) for q, v in rows]
    return dict(processor(images=images or None, videos=videos or None, text=texts, return_tensors="pt",
                          padding=True))
