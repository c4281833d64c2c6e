"""A tiny random LLaVA-NeXT model with an offline processor, for tests (docs/notes/llava-next-study.md, section 2).

:func:`save_tiny_llava_next` builds it (CLIP 28-px crops of 7-px patches, so 4x4 = 16 tokens per
crop; a 3-layer Llama 32 wide; pinpoints 28x56, 56x28, 56x56) and saves model and processor with
``save_pretrained``, so the adapter loads them as it loads a real checkpoint. A 40x80 (h x w) image
takes 1x2 crops: 16 base tokens + 4 canvas rows of 8 + 4 newlines = 52; 80x40 takes 2x1: 16 + 8 rows
of 4 + 8 = 56; 56x56 takes 2x2: 16 + 8 x (8 + 1) = 88.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from random_media import random_image, seed_of

import tokensieve  # noqa: F401  (its torchvision shim must come before transformers)
from tokensieve.backbones.llava_prompt import prompt

# isort: split
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL = ["<pad>", "</s>", "<image>"]
WORDS = ["USER", "ASSISTANT", ":", "what", "is", "the", "colour", "of", "shape", "red", "green", "blue", "circle",
         "square", "and", "left", "right", "?"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
IMAGE_SIZES = {"wide": (40, 80), "tall": (80, 40), "square": (56, 56)}  # (height, width)
TOKENS = {"wide": 52, "tall": 56, "square": 88}  # packed tokens, newlines included
NEWLINES = {"wide": 4, "tall": 8, "square": 8}

# One image per row, three aspect ratios, questions of different lengths.
ROWS = [("what is the colour ?", "wide"), ("what shape is left and right ?", "square"), ("what colour ?", "tall")]


def tokenizer(vocab: dict[str, int] = VOCAB) -> PreTrainedTokenizerFast:
    """Whitespace-split words of ``vocab``; its placeholders (``<image>``, ``<video>``) kept whole; left padding."""
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": [t for t in ("<image>", "<video>") if t in vocab]})
    return tok


def tower_and_llm(vocab: dict[str, int] = VOCAB) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The CLIP tower (28-px crops of 7-px patches) and the 3-layer Llama of a ``vocab``-sized vocabulary."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=28, patch_size=7, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(vocab), max_position_embeddings=512, pad_token_id=0,
                       bos_token_id=None, eos_token_id=vocab["</s>"])
    return vision, text


def config() -> LlavaNextConfig:
    vision, text = tower_and_llm()
    return LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                           image_grid_pinpoints=PINPOINTS, image_token_index=VOCAB["<image>"])


def image_processor() -> LlavaNextImageProcessorPil:
    """28-px crops (``shortest_edge`` 28) of :data:`PINPOINTS`."""
    return LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                      image_grid_pinpoints=PINPOINTS)


def processor() -> LlavaNextProcessor:
    """The offline processor: 28-px crops, CLS dropped (``default``)."""
    return LlavaNextProcessor(image_processor=image_processor(), tokenizer=tokenizer(), patch_size=7,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def save_tiny_llava_next(folder: Path, seed: int = 0) -> Path:
    """The random tiny model and its processor, saved in ``folder``."""
    torch.manual_seed(seed)
    LlavaNextForConditionalGeneration(config()).save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


def image(size: str, seed: int = 0) -> Image.Image:
    """A random RGB image of :data:`IMAGE_SIZES` ``size``."""
    return random_image(*IMAGE_SIZES[size], seed)


def inputs(processor, rows, first: int | list[int] = 0) -> dict:
    """Processor inputs of ``rows`` ``(question, image size)``, left-padded; row ``b``'s image is
    ``image(size, seed=first + b)`` (``first``: a row's index in :data:`ROWS`, to ask it alone; a list: each
    row's seed)."""
    return dict(processor(images=[image(size, seed=seed_of(first, b)) for b, (_, size) in enumerate(rows)],
                          text=[prompt(q) for q, _ in rows], return_tensors="pt", padding=True))
