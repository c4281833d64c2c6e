"""The ViT adapter for a CLIP model, whichever library built it."""

from __future__ import annotations

from tokensieve.backbones.hf_clip import HFClipViTBackbone
from tokensieve.backbones.open_clip_vit import OpenClipViTBackbone
from tokensieve.errors import TokensieveError


def vit_backbone(model):
    """The ViT adapter for ``model`` (open_clip or transformers CLIP), or a :class:`TokensieveError`."""
    if hasattr(model, "visual") or type(model).__module__.startswith("open_clip"):
        return OpenClipViTBackbone(model)
    if hasattr(model, "vision_model") or hasattr(model, "embeddings"):
        return HFClipViTBackbone(model)
    raise TokensieveError(f"{type(model).__name__} is neither an open_clip model with a ViT image tower nor a "
                          "transformers CLIP vision model; tokensieve prunes ViT image tokens only")
