"""Adapter for transformers' CLIP vision towers (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
``CLIPModel``; transformers 5.x).

The only code that knows their module paths: the tower (the model itself, or
``model.vision_model``) has ``embeddings`` (``patch_embedding``, ``num_patches``) and
``encoder.layers[i]`` (``CLIPEncoderLayer``: ``layer_norm1``, ``self_attn`` with
``q_proj``/``k_proj``/``v_proj``, ...); ``self_attn`` receives the normalised states as the
``hidden_states`` keyword. The pooled output is ``post_layernorm`` of the token at index 0
(CLS), so removing patch tokens needs no fix-up.
"""

from __future__ import annotations

import torch
from torch import nn

from tokensieve.backbones.base import Site
from tokensieve.backbones.vit_pruning import ViTPruningSession, vit_signals_at
from tokensieve.errors import TokensieveError


class HFClipViTBackbone:
    """A transformers CLIP vision tower seen through sites."""

    def __init__(self, model: nn.Module):
        tower = model if hasattr(model, "embeddings") else getattr(model, "vision_model", None)
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if tower is None or layers is None or not hasattr(getattr(tower, "embeddings", None), "num_patches") \
                or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in layers):
            raise TokensieveError(f"expected a transformers CLIP vision model (CLIPVisionModel or CLIPModel), "
                                  f"got {type(model).__name__}")
        self.model, self.tower = model, tower

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def n_patches(self) -> int:
        return int(self.tower.embeddings.num_patches)

    @property
    def image_size(self) -> int:
        return int(self.tower.embeddings.image_size)

    @property
    def geometry(self) -> tuple[int, int, float]:
        """``(width, patch size, MLP hidden / width)``, for FLOPs counts."""
        fc = self.blocks[0].mlp.fc1
        return fc.in_features, int(self.tower.embeddings.patch_size), fc.out_features / fc.in_features

    def sites(self) -> list:
        return [Site("vision", i) for i in range(1, self.depth)]

    def signals_at(self, site: Site) -> set[str]:
        """The signals a method can read at ``site`` (block ``i - 1``'s attention at ``vision.i``)."""
        return vit_signals_at(self, site)

    def hook_attention_input(self, block: int, fn):
        def hook(_module, args, kwargs):
            fn(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return self.blocks[block].self_attn.register_forward_pre_hook(hook, with_kwargs=True)

    def _heads(self, block: int, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.blocks[block].self_attn.num_heads, -1).transpose(1, 2)

    def queries(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, d_h)`` block ``block``'s queries of the normalised states ``x`` ``(B, T, d)``."""
        return self._heads(block, self.blocks[block].self_attn.q_proj(x))

    def keys(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, d_h)`` block ``block``'s keys of ``x``."""
        return self._heads(block, self.blocks[block].self_attn.k_proj(x))

    def attention_scale(self, block: int) -> float:
        return float(self.blocks[block].self_attn.scale)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, d)`` pooled CLS features (image embeddings for ``CLIPModel``)."""
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return self.model(pixel_values=pixel_values).pooler_output

    def install(self, handle, seed: int = 0) -> None:
        """Register the hooks of ``handle``'s stages (called by :func:`tokensieve.attach`)."""
        ViTPruningSession(self, handle, seed)
