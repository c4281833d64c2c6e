"""Adapter for open_clip ViT image towers (open_clip 3.3; NOTES.md).

The only code that knows open_clip's module paths: ``model.visual`` is a ``VisionTransformer``
whose ``transformer.resblocks[i]`` are ``ResidualAttentionBlock`` (``ln_1``, ``attn``, ...),
``attn`` an ``nn.MultiheadAttention(batch_first=True)`` called with ``ln_1(x)`` as its first
argument and ``need_weights=False``. Queries and keys are the first two thirds of
``attn.in_proj_weight``/``in_proj_bias``. CLS sits at index 0 and pooling (``'tok'`` or
``'avg'``) reads whatever tokens reach the end, so removing patch tokens needs no fix-up.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tokensieve.backbones.base import Site
from tokensieve.backbones.vit_pruning import ViTPruningSession, vit_signals_at
from tokensieve.errors import TokensieveError
from tokensieve.optional import import_open_clip


class OpenClipViTBackbone:
    """An open_clip model (``CLIP``, ``CustomTextCLIP``) or its ``VisionTransformer`` seen through sites."""

    def __init__(self, model: nn.Module):
        oc = import_open_clip()
        visual = getattr(model, "visual", model)
        if not isinstance(visual, oc.transformer.VisionTransformer):
            raise TokensieveError(f"the open_clip image tower is a {type(visual).__name__}, not a VisionTransformer; "
                                  "tokensieve removes the tokens of ViT image towers only")
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise TokensieveError("this open_clip ViT pools with an attentional pooler or returns every token; "
                                  "tokensieve supports CLS ('tok') or mean ('avg') pooling")
        blocks = visual.transformer.resblocks
        if not visual.transformer.batch_first or not all(
                isinstance(b, oc.transformer.ResidualAttentionBlock) and isinstance(b.attn, nn.MultiheadAttention)
                for b in blocks):
            raise TokensieveError(f"this open_clip ViT uses {type(blocks[0]).__name__} blocks; tokensieve supports "
                                  "ResidualAttentionBlock with nn.MultiheadAttention (batch first)")
        self.model, self.visual = model, visual

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def n_patches(self) -> int:
        return self.visual.grid_size[0] * self.visual.grid_size[1]

    @property
    def image_size(self) -> int:
        return self.visual.image_size[0]

    @property
    def geometry(self) -> tuple[int, int, float]:
        """``(width, patch size, MLP hidden / width)``, for FLOPs counts."""
        fc = self.blocks[0].mlp.c_fc
        return fc.in_features, self.visual.patch_size[0], fc.out_features / fc.in_features

    def sites(self) -> list:
        return [Site("vision", i) for i in range(1, self.depth)]

    def signals_at(self, site: Site) -> set[str]:
        """The signals a method can read at ``site`` (block ``i - 1``'s attention at ``vision.i``)."""
        return vit_signals_at(self, site)

    def hook_attention_input(self, block: int, fn):
        return self.blocks[block].attn.register_forward_pre_hook(lambda _m, args: fn(args[0]))

    def _project(self, block: int, x: torch.Tensor, part: int) -> torch.Tensor:
        attn = self.blocks[block].attn
        d, heads = attn.embed_dim, attn.num_heads
        weight = attn.in_proj_weight[part * d:(part + 1) * d]
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[part * d:(part + 1) * d]
        b, t, _ = x.shape
        return F.linear(x, weight, bias).view(b, t, heads, d // heads).transpose(1, 2)

    def queries(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, d_h)`` block ``block``'s queries of the normalised states ``x`` ``(B, T, d)``."""
        return self._project(block, x, 0)

    def keys(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, d_h)`` block ``block``'s keys of ``x``."""
        return self._project(block, x, 1)

    def attention_scale(self, block: int) -> float:
        attn = self.blocks[block].attn
        return (attn.embed_dim // attn.num_heads) ** -0.5

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, d_embed)`` image embeddings (``encode_image`` without normalising)."""
        return self.model.encode_image(pixel_values) if hasattr(self.model, "encode_image") else self.visual(pixel_values)

    def install(self, handle, seed: int = 0) -> None:
        """Register the hooks of ``handle``'s stages (called by :func:`tokensieve.attach`)."""
        ViTPruningSession(self, handle, seed)
