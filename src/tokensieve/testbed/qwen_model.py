"""Build the Qwen testbed: a real ``Qwen2_5_VLForConditionalGeneration`` (small window-attention
tower, 2x2 patch merger, Qwen2 LLM with M-RoPE) and its offline ``Qwen2_5_VLProcessor``.

Geometry: 4px patches merged 2x2, so one visual token is an 8px square, the scene unit of
:data:`QWEN_SCENES`: the LLaVA testbed's scenes (8px patches, objects on 2x2 of them) at four sizes.
The scenes come in four sizes, 64 to 100 tokens, so rows of a batch carry different counts.
"""

from __future__ import annotations

# tokensieve first: its torchvision fix must come before transformers' Qwen classes.
from tokensieve.data.synthetic import SceneSpec, vocabulary
from tokensieve.testbed.model import TestbedSize
from tokensieve.testbed.processor import CLIP_MEAN, CLIP_STD

# isort: split
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen2VLVideoProcessor,
)

PATCH, MERGE, TEMPORAL = 4, 2, 2
TOKEN_PIXELS = PATCH * MERGE  # one visual token covers 8x8 px, as one LLaVA testbed patch
# (height, width) px: 8x8, 8x10, 10x9 and 10x10 tokens (64, 80, 90, 100). The largest is the LLaVA
# testbed's 10x10 grid, so prompts are about as long as its; sides of 8, 9 and 10 tokens cut full
# and partial (4x1, 4x2) windows.
QWEN_SIZES = ((64, 64), (64, 80), (80, 72), (80, 80))
QWEN_SCENES = SceneSpec(image_size=80, patch_size=TOKEN_PIXELS, sizes=QWEN_SIZES)
# M-RoPE gives a visual token's (h, w) ids the lower frequencies: with 16 of them split [4, 6, 6],
# width gets the 6 lowest. At the usual theta 1e4 they turn at most 0.028 rad across a 10-token
# row, so attention could not tell columns apart (the 7B's 1e6 over its ~50-token rows is no
# better; Qwen3-VL interleaves the axes for this reason). At 32 they turn 0.35-1.03 rad, and rows
# 1.3-3.8 rad; text prompts here are under 150 tokens, so no frequency needs to be slower.
ROPE_THETA = 32.0
WINDOW = 4 * TOKEN_PIXELS  # window attention over 4x4 tokens (8x8 patches), as Qwen2.5-VL's 112px / 14px
SPECIAL_TOKENS = ("<pad>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>")
CHAT_WORDS = ("system", "user", "assistant", "You", "are", "a", "helpful", ".")


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the synthetic and chat-template words; no BOS (as Qwen's)."""
    words = sorted(set(vocabulary()) | set(CHAT_WORDS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                  padding_side="left")  # the last position is each prompt's answer slot
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[2:])})
    return tok


def build_qwen_processor() -> Qwen2_5_VLProcessor:
    """The processor; ``min_pixels`` / ``max_pixels`` bracket :data:`QWEN_SIZES`, which are
    multiples of 8 px (the patch times the merge), so ``smart_resize`` keeps every image at its own size."""
    pixels = [h * w for h, w in QWEN_SIZES]
    patches = {"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL}
    images = Qwen2VLImageProcessorPil(min_pixels=min(pixels), max_pixels=max(pixels), image_mean=list(CLIP_MEAN),
                                      image_std=list(CLIP_STD), **patches)
    return Qwen2_5_VLProcessor(image_processor=images, tokenizer=build_qwen_tokenizer(),
                               video_processor=Qwen2VLVideoProcessor(**patches))


def build_qwen_testbed_model(tokenizer: PreTrainedTokenizerFast, size: TestbedSize = TestbedSize()
                             ) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL: ``size.vision_layers`` tower blocks with window attention
    but the last (full attention, as Qwen2.5-VL's every fourth), a Qwen2 LLM of ``size.text_layers``."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    half = size.text_hidden // size.text_heads // 2
    # Qwen2.5-VL-7B splits its 64 rotary frequencies 16 / 24 / 24 over (t, h, w): the same shares.
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text = {"hidden_size": size.text_hidden, "intermediate_size": 4 * size.text_hidden,
            "num_hidden_layers": size.text_layers, "num_attention_heads": size.text_heads,
            "num_key_value_heads": size.text_heads, "vocab_size": len(tokenizer), "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": mrope}}
    # The tower's SwiGLU MLP is as wide as Qwen2.5-VL-7B's (3420 / 1280), which costs what a 4x GELU MLP does.
    vision = {"depth": size.vision_layers, "hidden_size": size.vision_hidden, "num_heads": size.vision_heads,
              "intermediate_size": size.vision_hidden * 3420 // 1280, "out_hidden_size": size.text_hidden,
              "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL, "in_channels": 3,
              "window_size": WINDOW, "fullatt_block_indexes": [size.vision_layers - 1], "tokens_per_second": 2}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()
