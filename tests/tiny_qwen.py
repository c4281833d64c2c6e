"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models with offline processors, for tests.

:func:`save_tiny_qwen` builds one family (a few thousand weights, < 1 s) and saves model and
processor with ``save_pretrained``, so the adapter loads them as it loads a real checkpoint.
Processor: a local WordLevel tokenizer that knows the chat and vision special tokens, the PIL
image processor (patch 14, 2x2 merge, min 28x28 px), and the family's video processor (no frame
sampling or resizing of the tiny videos; it runs on numpy frames, without torchvision or a decoder).
A 112x112 image is a 8x8 patch grid -> 16 visual tokens; 56x84 -> 4x6 -> 6 tokens; a video of 4 56x84
frames -> 2 temporal patches of 2x3 merged tokens -> 12 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from random_media import random_image, random_video, seed_of

import tokensieve  # noqa: F401  (its torchvision shim must come before transformers' Qwen classes)
from tokensieve.backbones.qwen_prompt import IMAGE, VIDEO, prompt

# isort: split
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIAL = ["<pad>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", "?", "what", "is", "the", "colour",
         "of", "shape", "red", "green", "blue", "circle", "square", "and", "left", "right"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}
IMAGE_SIZES = {"big": (112, 112), "small": (56, 84)}  # (height, width) -> 16 and 6 visual tokens
VIDEO_SHAPE = (4, 56, 84)  # (frames, height, width) -> 2 x 2 x 3 = 12 visual tokens


# Row 0: one 112x112 image (16 tokens); row 1: a 56x84 image (6) then a 112x112 one (16).
ROWS = [("what is the colour ?", ["big"]), ("what shape is left and right ?", ["small", "big"])]


def tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words of :data:`WORDS`; special tokens kept whole; left padding."""
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                  padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[2:]})
    return tok


def _config(family: str):
    ids = {"image_token_id": VOCAB["<|image_pad|>"], "video_token_id": VOCAB["<|video_pad|>"],
           "vision_start_token_id": VOCAB["<|vision_start|>"], "vision_end_token_id": VOCAB["<|vision_end|>"]}
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": len(VOCAB), "max_position_embeddings": 512, "pad_token_id": 0,
            "bos_token_id": None, "eos_token_id": VOCAB["<|im_end|>"]}
    vision = {"depth": 3, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "in_channels": 3}
    rope = {"rope_type": "default", "rope_theta": 1e4}  # mrope_section sums to head_dim / 2 = 8
    if family == "qwen2_vl":
        return Qwen2VLConfig(text_config={**text, "rope_parameters": {**rope, "mrope_section": [2, 3, 3]}},
                             vision_config={**vision, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}, **ids)
    vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64)
    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": {**rope, "mrope_section": [2, 3, 3]}},
                                vision_config={**vision, "window_size": 56, "fullatt_block_indexes": [2],
                                               "tokens_per_second": 2}, **ids)
    return Qwen3VLConfig(text_config={**text, "head_dim": 16, "rope_parameters": {**rope, "mrope_section": [4, 2, 2]}},
                         vision_config={**vision, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]},
                         **ids)


MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                 "qwen3_vl": Qwen3VLForConditionalGeneration}
PROCESSOR_CLASSES = {"qwen2_vl": (Qwen2VLProcessor, Qwen2VLVideoProcessor),
                     "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
                     "qwen3_vl": (Qwen3VLProcessor, Qwen3VLVideoProcessor)}


def processor(family: str):
    """The offline processor of ``family`` (images 28x28 .. 224x224 px)."""
    processor_class, video_class = PROCESSOR_CLASSES[family]
    patches = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    # Qwen3-VL's video bounds count the pixels of every frame together; every frame is kept as given.
    frames = {"do_sample_frames": False, "size": {"shortest_edge": 28 * 28, "longest_edge": 4 * 224 * 224}} \
        if family == "qwen3_vl" else {"size": {"shortest_edge": 28 * 28, "longest_edge": 224 * 224}}
    return processor_class(image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=224 * 224, **patches),
                           tokenizer=tokenizer(),
                           video_processor=video_class(**patches, **frames, cap_pixels_per_frame=False))


def save_tiny_qwen(family: str, folder: Path, seed: int = 0) -> Path:
    """A random tiny ``family`` model (3 vision blocks, 3 decoder layers) and its processor,
    saved in ``folder``."""
    torch.manual_seed(seed)
    MODEL_CLASSES[family](_config(family)).save_pretrained(folder)
    processor(family).save_pretrained(folder)
    return folder


def image(size: str, seed: int = 0) -> Image.Image:
    """A random RGB image of :data:`IMAGE_SIZES` ``size``."""
    return random_image(*IMAGE_SIZES[size], seed)


def video(seed: int = 0, frames: int = VIDEO_SHAPE[0]) -> np.ndarray:
    """A random video of ``frames`` frames of :data:`VIDEO_SHAPE`'s size: ``(frames, height, width, 3)`` uint8."""
    return random_video(frames, *VIDEO_SHAPE[1:], seed)


def inputs(qwen, rows, first: int | list[int] = 0, frames: int = VIDEO_SHAPE[0]) -> dict:
    """Processor inputs of ``rows`` for the adapter ``qwen``, each row ``(question, [visuals])``, a visual an
    image size of :data:`IMAGE_SIZES` or ``"video"``, left-padded; with ``first + row index`` as seed
    (``first[row]`` for a list), the row's images are ``image(size, seed)``, its videos ``video(seed, frames)``
    (2 frames a second: Qwen3-VL's timestamps, Qwen2.5-VL's seconds per temporal patch)."""
    texts = [prompt("".join(VIDEO if v == "video" else IMAGE for v in visuals) + q, [], qwen.system_prompt)
             for q, visuals in rows]
    images = [image(v, seed=seed_of(first, i)) for i, (_, visuals) in enumerate(rows) for v in visuals
              if v != "video"]
    videos = [video(seed=seed_of(first, i), frames=frames) for i, (_, visuals) in enumerate(rows) for v in visuals
              if v == "video"]
    clips = {} if not videos else {"videos": videos, "video_metadata": [
        {"fps": 2.0, "total_num_frames": frames, "frames_indices": list(range(frames))}] * len(videos)}
    return dict(qwen.processor(images=images or None, text=texts, return_tensors="pt", padding=True, **clips))


def row_alone(qwen, batch: dict, b: int) -> dict:
    """Row ``b`` of :data:`ROWS` as a batch of its own for the adapter ``qwen``, with the images it has in
    ``batch`` (``inputs(qwen, ROWS)``): their pixel rows cut out of the batch's."""
    alone = inputs(qwen, [ROWS[b]])
    first = int(batch["image_grid_thw"][:b].prod(-1).sum())  # the same images as in the batch
    alone["pixel_values"] = batch["pixel_values"][first: first + len(alone["pixel_values"])]
    return alone


def assert_rows_alone_as_in_batch(qwen, batch: dict, handle, kept_rows: list[list[int]]) -> None:
    """With ``handle`` attached, each row of ``batch`` (``inputs(qwen, ROWS)``) run alone (:func:`row_alone`)
    gives the last logits and keeps the tokens it does in the batch; ``kept_rows[b]``: the rows of
    ``handle.last_kept`` in the batch that are row ``b``'s (its images at ``llm.0``, the row inside the LLM)."""
    with torch.no_grad():
        together, kept = qwen.forward(**batch).logits[:, -1], kept_of(handle)
        for b, rows in enumerate(kept_rows):
            single = qwen.forward(**row_alone(qwen, batch, b)).logits[:, -1]
            torch.testing.assert_close(together[b: b + 1], single, rtol=1e-5, atol=1e-5)
            alone = kept_of(handle)
            assert len(alone) == len(rows) and all(torch.equal(kept[i], k) for i, k in zip(rows, alone))


def until_eos(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row's tokens up to and including its first ``eos`` (generate pads after it)."""
    return [row[: row.index(eos) + 1] if eos in row else row for row in tokens.tolist()]


def kept_of(handle) -> list[torch.Tensor]:
    """Per row of ``handle.last_kept`` (an image at ``llm.0``, a prompt row inside the LLM) the indices
    its first stage kept, without the padding slots."""
    return [row[row >= 0] for row in handle.last_kept[str(handle.stages[0])]]
