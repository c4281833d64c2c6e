"""A tiny random LLaVA-OneVision model with an offline processor, for tests (docs/notes/llava-next-study.md,
section 2).

:func:`save_tiny_onevision` builds it (SigLIP 28-px crops of 7-px patches, so 4x4 = 16 tokens per crop and no
CLS token; a 3-layer Qwen2 32 wide; pinpoints up to 3x3 crops; ``anyres_max_2``, so a canvas of more than
about 2 crops' tokens is interpolated down) and saves model and processor with ``save_pretrained``, so the
adapter loads them as it loads a real checkpoint. The three images of :data:`ROWS`: 20x40 (h x w) takes 1x2
crops, a 4x8 canvas kept as it is (16 + 4 x (8 + 1) = 52 tokens); 56x56 takes 2x2, an 8x8 canvas interpolated
to 5x5 (16 + 5 x 6 = 46); 30x90 takes 1x3, a 4x12 canvas interpolated to 3x9 (16 + 3 x 10 = 46). A video of
4 frames of 28x28 gives 4 x 2x2 pooled tokens and one newline (17).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from random_media import random_image, random_video, seed_of

import tokensieve  # noqa: F401  (its torchvision shim must come before transformers)
from tokensieve.backbones.onevision_prompt import prompt

# isort: split
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

SPECIAL = ["<pad>", "<|im_end|>", "<|im_start|>", "<image>", "<video>"]
WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", "?", "what", "is", "the", "colour",
         "of", "shape", "red", "green", "blue", "circle", "square", "and", "left", "right", "happens"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [84, 84]]
ASPECT = "anyres_max_2"
IMAGE_SIZES = {"wide": (20, 40), "square": (56, 56), "long": (30, 90)}  # (height, width)
VIDEO_SHAPE = (4, 28, 28)  # (frames, height, width) -> 4 x 2x2 pooled tokens + 1 newline

# One image or video per row, three aspect ratios, questions of different lengths.
ROWS = [("what is the colour ?", "wide"), ("what shape is left and right ?", "square"), ("what colour ?", "long")]


def tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words of :data:`WORDS`; special tokens kept whole; left padding."""
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                  padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    return tok


def config() -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=28, patch_size=7, vision_use_head=False)
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(VOCAB), max_position_embeddings=512, pad_token_id=0,
                       bos_token_id=None, eos_token_id=VOCAB["<|im_end|>"])
    return LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                image_grid_pinpoints=PINPOINTS, image_token_index=VOCAB["<image>"],
                                video_token_index=VOCAB["<video>"], vision_aspect_ratio=ASPECT)


def processor() -> LlavaOnevisionProcessor:
    """The offline processor: 28-px crops, every tower token kept (``full``: SigLIP has no CLS)."""
    images = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
    videos = LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28}, do_sample_frames=False)
    return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer(), video_processor=videos,
                                   num_image_tokens=16, vision_feature_select_strategy="full",
                                   vision_aspect_ratio=ASPECT)


def save_tiny_onevision(folder: Path, seed: int = 0) -> Path:
    """The random tiny model and its processor, saved in ``folder``."""
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(config()).save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


def image(size: str, seed: int = 0) -> Image.Image:
    """A random RGB image of :data:`IMAGE_SIZES` ``size``."""
    return random_image(*IMAGE_SIZES[size], seed)


def video(seed: int = 0, frames: int = VIDEO_SHAPE[0]) -> np.ndarray:
    """A random video of ``frames`` frames of :data:`VIDEO_SHAPE`'s size: ``(frames, height, width, 3)`` uint8."""
    return random_video(frames, *VIDEO_SHAPE[1:], seed)


def inputs(processor, rows, first: int | list[int] = 0, frames: int = VIDEO_SHAPE[0]) -> dict:
    """Processor inputs of ``rows`` ``(question, image size or "video")``, left-padded; row ``b``'s image
    is ``image(size, seed=first + b)``, its video ``video(seed=first + b, frames)`` (``first``: a row's index in
    its list, to ask it alone; a list: each row's seed)."""
    images = [image(v, seed=seed_of(first, b)) for b, (_, v) in enumerate(rows) if v != "video"]
    videos = [video(seed=seed_of(first, b), frames=frames) for b, (_, v) in enumerate(rows) if v == "video"]
    texts = [prompt(q, "video" if v == "video" else "image") for q, v in rows]
    return dict(processor(images=images or None, videos=videos or None, text=texts, return_tensors="pt",
                          padding=True))
