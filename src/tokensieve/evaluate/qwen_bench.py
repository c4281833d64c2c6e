"""A Qwen2.5-VL-shaped model for ``tokensieve bench speed --shape qwen2.5-vl-cpu|qwen2.5-vl-7b``.

Randomly initialised from a config (no hub; a random model of a given shape times like a trained
one), with one image per prompt at a realistic size: 1288 x 812 px is a 92 x 58 patch grid (14 px
patches, 5,336 patches through the tower) and 46 x 29 = **1,334 visual tokens** after the 2x2
merger. The prompt: ``<|vision_start|>`` after 13 text tokens, the image run, ``<|vision_end|>``
and 25 more text tokens (40 text tokens, as the LLaVA shape's). The special tokens (image, video,
vision start and end, end of text, padding) take the vocabulary's last ids, which for a random
model are as good as Qwen's own.

:meth:`QwenBenchShape.qwen25_vl_7b` is Qwen2.5-VL-7B-Instruct's architecture; the default is its
CPU-sized variant, scaled as the LLaVA CPU shape scales LLaVA-1.5-7B: the same image and token
counts, the LLM at 8 layers x 512 (its MLP at the 7B's ratio, grouped-query attention, M-RoPE
sections halved with the head width) and a narrow tower of one quarter of the 7B's blocks in the
same pattern (seven window-attention blocks, then one with full attention), 192 wide: the tower and
merger stay 29% of the linear FLOPs (the 7B: 28%), as the LLaVA CPU shape keeps its tower's share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.evaluate.bench_question import ClipTextSize
from tokensieve.evaluate.qwen_bounds import native_qwen_prefill, qwen_native_plan
from tokensieve.evaluate.qwen_flops import qwen_llm_tokens, qwen_prefill_flops
from tokensieve.evaluate.speed import build_random

PREFIX = 13  # text tokens before <|vision_start|> (fewer in a prompt of under 28)


@dataclass(frozen=True)
class QwenBenchShape:
    """A Qwen2.5-VL-shaped model and its prompt. The defaults fit a CPU; ``qwen25_vl_7b()`` is
    Qwen2.5-VL-7B. Images are ``image_height x image_width`` px, multiples of ``patch_size * 2``."""

    llm_layers: int = 8
    llm_hidden: int = 512
    llm_heads: int = 8
    llm_kv_heads: int = 2
    llm_intermediate: int = 2706  # the 7B's 18944 / 3584
    mrope_section: tuple[int, int, int] = (8, 12, 12)  # t/h/w rotary pairs: half the head width
    vision_layers: int = 8
    vision_hidden: int = 192
    vision_heads: int = 3
    vision_intermediate: int = 513  # the 7B's 3420 / 1280
    fullatt_blocks: tuple[int, ...] = (7,)  # the rest attend within windows
    window_size: int = 112  # px: 4 x 4 tokens
    image_height: int = 812
    image_width: int = 1288
    patch_size: int = 14
    text_tokens: int = 40
    vocab: int = 152064
    clip_text: ClipTextSize = ClipTextSize()  # for methods that read the question through CLIP (CDPruner)
    always_kept: ClassVar[int] = 0  # no image token stays whatever the budget

    @classmethod
    def qwen25_vl_7b(cls) -> QwenBenchShape:
        return cls(llm_layers=28, llm_hidden=3584, llm_heads=28, llm_kv_heads=4, llm_intermediate=18944,
                   mrope_section=(16, 24, 24), vision_layers=32, vision_hidden=1280, vision_heads=16,
                   vision_intermediate=3420, fullatt_blocks=(7, 15, 23, 31), clip_text=ClipTextSize.clip_l())

    @property
    def projector_input_width(self) -> int:
        """The merger's input: 2 x 2 patches of the tower's width. No CLIP is that wide; a method reading CLIP
        patch embeddings (CDPruner) gets a random projection from it."""
        return 4 * self.vision_hidden

    @property
    def grid(self) -> tuple[int, int, int]:
        """The image's ``(t, h, w)`` patch grid."""
        return 1, self.image_height // self.patch_size, self.image_width // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def n_visual(self) -> int:
        return self.n_patches // 4

    def config(self) -> Qwen2_5_VLConfig:
        image, video, start, end, eos, pad = (self.vocab - 1 - i for i in range(6))
        text = {"hidden_size": self.llm_hidden, "intermediate_size": self.llm_intermediate,
                "num_hidden_layers": self.llm_layers, "num_attention_heads": self.llm_heads,
                "num_key_value_heads": self.llm_kv_heads, "vocab_size": self.vocab, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": eos,
                "pad_token_id": pad,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(self.mrope_section)}}
        vision = {"depth": self.vision_layers, "hidden_size": self.vision_hidden, "num_heads": self.vision_heads,
                  "intermediate_size": self.vision_intermediate, "out_hidden_size": self.llm_hidden,
                  "patch_size": self.patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": self.window_size, "fullatt_block_indexes": list(self.fullatt_blocks),
                  "tokens_per_second": 2}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                                vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=False)

    # --- what tokensieve.evaluate.speed asks of a shape ---------------------------------------
    def build(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> QwenVLBackbone:
        return QwenVLBackbone(build_random(Qwen2_5_VLForConditionalGeneration, self.config(), dtype, device))

    def inputs(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """``batch`` prompts of one random image each: ``input_ids``, ``attention_mask`` ``(B, L)``,
        ``pixel_values`` ``(B * n_patches, 3 * 2 * 14 * 14)`` packed, ``image_grid_thw`` ``(B, 3)``."""
        g = torch.Generator().manual_seed(0)
        image, _, start, end = (self.vocab - 1 - i for i in range(4))
        words = torch.randint(0, self.vocab - 6, (batch, self.text_tokens - 2), generator=g)
        prefix = min(PREFIX, (self.text_tokens - 2) // 2)
        ids = torch.cat([words[:, :prefix], torch.full((batch, 1), start), torch.full((batch, self.n_visual), image),
                         torch.full((batch, 1), end), words[:, prefix:]], 1)
        pixels = torch.randn(batch * self.n_patches, 3 * 2 * self.patch_size ** 2, generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                "image_grid_thw": torch.tensor([self.grid] * batch)}

    def compiled_modules(self, backbone: QwenVLBackbone) -> tuple:
        return backbone.visual, backbone.model

    def language_model(self, backbone: QwenVLBackbone):
        return backbone.model.model.language_model

    def encode(self, backbone: QwenVLBackbone, inputs: dict):
        return backbone.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])

    def ideal_speedup(self, backbone: QwenVLBackbone, handle) -> float:
        def linear(h) -> int:
            llm = qwen_llm_tokens(self.llm_layers, self.text_tokens, self.n_visual, h)
            return qwen_prefill_flops(backbone.config, self.grid, llm, attention_scores=False)["total"]

        return linear(None) / linear(handle)

    def native_bound(self, handle, backbone: QwenVLBackbone, native: QwenVLBackbone, inputs: dict):
        """``(bound, short_kept)``: the row's native prefill as a function, and per image the visual
        tokens a natively short prompt keeps (:mod:`tokensieve.evaluate.qwen_bounds`)."""
        plan, short_kept = qwen_native_plan(handle, backbone, inputs["input_ids"], inputs["attention_mask"],
                                            inputs["image_grid_thw"])
        return (lambda: native_qwen_prefill(native, **inputs, plan=plan)), short_kept
