"""A tiny CLIP (both towers, random weights) and a byte-level tokeniser made offline, for methods
that read a question through CLIP's text tower (CDPruner)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

POSITIONS = 16  # the text tower's max_position_embeddings: a segment is 16 tokens


def tokenizer() -> CLIPTokenizerFast:
    """A CLIP tokeniser without merges: every character is a token."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + len(chars) for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizerFast(vocab=vocab, merges=[])


def tiny_clip(width: int) -> CLIPModel:
    """A random CLIP whose vision tower is ``width`` wide (the width of the tower it stands beside)."""
    torch.manual_seed(0)
    text = {"vocab_size": 514, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": POSITIONS, "bos_token_id": 0, "pad_token_id": 1,
            "eos_token_id": 2, "projection_dim": 8}
    vision = {"hidden_size": width, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "projection_dim": 8}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()


def save_tiny_clip(folder: Path, width: int) -> Path:
    """``tiny_clip(width)`` and its tokeniser saved with ``save_pretrained`` in ``folder``."""
    tiny_clip(width).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder
