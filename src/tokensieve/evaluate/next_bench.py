"""A LLaVA-NeXT-shaped model for ``tokensieve bench speed --shape llava-next-cpu|llava-next-7b``.

Randomly initialised from a config (no hub; a random model of a given shape times like a trained
one), with one anyres image per prompt: a 672 x 672 px image is a base crop and 2 x 2 crops of
336 px, each a 24 x 24 grid of 14 px patches, so **2,880 visual tokens** (5 x 576) and, as the model
packs them, one newline after each of the crops' canvas's 48 rows: 2,928 image tokens in the
prompt. The prompt: 3 text tokens, the image run and 37 more (40 text tokens, as the LLaVA shape's).
Budgets are ratios of the 2,880 base and crop tokens; the newlines stay (the adapter's policy).

:meth:`NextBenchShape.llava_next_7b` is LLaVA-NeXT-7B's architecture (llava-v1.6-vicuna-7b: CLIP
ViT-L/14 at 336 px, feature layer -2, Vicuna-7B); the default is its CPU-sized variant, scaled as
the LLaVA CPU shape scales LLaVA-1.5-7B: the same image and token counts, the LLM at 8 layers x 512
and the tower at 2 blocks x 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from tokensieve.backbones.anyres_layout import AnyresLayout, anyres_layout
from tokensieve.backbones.base import Site
from tokensieve.backbones.hf_llava_next import LlavaNextBackbone
from tokensieve.evaluate.bench_question import ClipTextSize
from tokensieve.evaluate.flops import prefill_flops
from tokensieve.evaluate.next_bounds import native_next_prefill, next_native_plan
from tokensieve.evaluate.speed import build_random

PREFIX = 3  # text tokens before the image run ("<s> USER :")


@dataclass(frozen=True)
class NextBenchShape:
    """A LLaVA-NeXT-shaped model and its prompt. The defaults fit a CPU; ``llava_next_7b()`` is
    LLaVA-NeXT-7B. Crops are ``crop_size`` px; the image ``image_height x image_width`` px."""

    llm_layers: int = 8
    llm_hidden: int = 512
    llm_heads: int = 8
    llm_intermediate: int = 1376  # LLaMA's 11008 / 4096 ratio
    vision_layers: int = 2
    vision_hidden: int = 256
    vision_heads: int = 4
    crop_size: int = 336
    patch_size: int = 14
    image_height: int = 672
    image_width: int = 672
    text_tokens: int = 40
    vocab: int = 32064
    clip_text: ClipTextSize = ClipTextSize()  # for methods that read the question through CLIP (CDPruner)

    @classmethod
    def llava_next_7b(cls) -> NextBenchShape:
        return cls(llm_layers=32, llm_hidden=4096, llm_heads=32, llm_intermediate=11008,
                   vision_layers=24, vision_hidden=1024, vision_heads=16, clip_text=ClipTextSize.clip_l())

    @property
    def projector_input_width(self) -> int:
        return self.vision_hidden

    @property
    def pinpoints(self) -> list[list[int]]:
        """LLaVA-NeXT's ``image_grid_pinpoints`` in crops: 1x2, 2x1, 2x2, 3x1, 1x3."""
        c = self.crop_size
        return [[c, 2 * c], [2 * c, c], [2 * c, 2 * c], [3 * c, c], [c, 3 * c]]

    @property
    def layout(self) -> AnyresLayout:
        """The image's packed run (base grid, crop canvas, newlines)."""
        return anyres_layout((self.image_height, self.image_width), self.pinpoints, self.crop_size,
                             self.crop_size // self.patch_size)

    @property
    def n_visual(self) -> int:
        """Image tokens in the prompt: base and crop tokens, and the newlines."""
        return len(self.layout)

    @property
    def always_kept(self) -> int:
        """The newlines: image tokens every prompt keeps, outside the budget."""
        return int(self.layout.is_newline.sum())

    def config(self) -> LlavaNextConfig:
        vision = CLIPVisionConfig(hidden_size=self.vision_hidden, intermediate_size=4 * self.vision_hidden,
                                  num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                                  image_size=self.crop_size, patch_size=self.patch_size)
        text = LlamaConfig(vocab_size=self.vocab, hidden_size=self.llm_hidden, intermediate_size=self.llm_intermediate,
                           num_hidden_layers=self.llm_layers, num_attention_heads=self.llm_heads,
                           max_position_embeddings=4096, pad_token_id=0)
        return LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_grid_pinpoints=self.pinpoints, image_token_index=self.vocab - 1,
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               image_seq_length=(self.crop_size // self.patch_size) ** 2)

    # --- what tokensieve.evaluate.speed asks of a shape ---------------------------------------
    def build(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlavaNextBackbone:
        return LlavaNextBackbone(build_random(LlavaNextForConditionalGeneration, self.config(), dtype, device))

    def inputs(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """``batch`` prompts of one random image each: ``input_ids``, ``attention_mask`` ``(B, L)``,
        ``pixel_values`` ``(B, crops, 3, S, S)``, ``image_sizes`` ``(B, 2)``. Every row holds the same image, so
        a method keeping a count of its own per image (HiRED) keeps as many in each, as the native bound needs."""
        g = torch.Generator().manual_seed(0)
        words = torch.randint(5, self.vocab - 2, (batch, self.text_tokens - PREFIX), generator=g)
        ids = torch.cat([torch.ones(batch, PREFIX, dtype=torch.long),
                         torch.full((batch, self.n_visual), self.vocab - 1), words], 1)
        image = torch.randn(1, self.layout.n_crops, 3, self.crop_size, self.crop_size, generator=g)
        pixels = image.expand(batch, -1, -1, -1, -1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                "image_sizes": torch.tensor([[self.image_height, self.image_width]] * batch)}

    def compiled_modules(self, backbone: LlavaNextBackbone) -> tuple:
        return backbone.model.model.vision_tower, backbone.projector, backbone.model

    def language_model(self, backbone: LlavaNextBackbone):
        return backbone.model.model.language_model

    def encode(self, backbone: LlavaNextBackbone, inputs: dict):
        return backbone.encode_images(inputs["pixel_values"], inputs["image_sizes"])

    def llm_tokens(self, handle=None) -> list[int]:
        """Tokens entering each decoder layer of one prefill: the text, the kept base and crop tokens
        (``handle.mean_kept`` of each stage, rounded), and the newlines unless the ``llm.0`` method drops
        them."""
        visual, newlines, tokens = self.n_visual - self.always_kept, self.always_kept, []
        stages = {} if handle is None else {Site.parse(st.site): st for st in handle.stages}
        for k in range(self.llm_layers):
            if (st := stages.get(Site("llm", k))) is not None:
                visual = round(handle.mean_kept(str(st)))
                newlines = 0 if getattr(st.method, "newlines", "keep") == "drop" else newlines
            tokens.append(self.text_tokens + visual + newlines)
        return tokens

    def linear_flops(self, config: LlavaNextConfig, handle=None) -> int:
        """The prefill's linear FLOPs (:func:`tokensieve.evaluate.flops.prefill_flops` without the
        attention scores): the tower on every crop, the projector on every crop's grid, the LLM layers
        on :meth:`llm_tokens`, the LM head on the last position."""
        per_crop = (self.crop_size // self.patch_size) ** 2
        crops = self.layout.n_crops
        flops = prefill_flops(config, [1 + per_crop] * self.vision_layers, crops * per_crop, self.llm_tokens(handle),
                              attention_scores=False)
        return flops["total"] + (crops - 1) * flops["vision"]  # prefill_flops counts one image through the tower

    def ideal_speedup(self, backbone: LlavaNextBackbone, handle) -> float:
        return self.linear_flops(backbone.config) / self.linear_flops(backbone.config, handle)

    def native_bound(self, handle, backbone: LlavaNextBackbone, native: LlavaNextBackbone, inputs: dict):
        """``(bound, short_kept)``: the row's native prefill as a function, and per image the positions
        in its packed run a natively short prompt keeps (:mod:`tokensieve.evaluate.next_bounds`)."""
        plan, short_kept = next_native_plan(handle, backbone, inputs["image_sizes"])
        return (lambda: native_next_prefill(native, **inputs, plan=plan)), short_kept
