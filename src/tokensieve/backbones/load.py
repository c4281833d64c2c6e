"""The one place that picks a backbone adapter for a checkpoint: by its config's ``model_type``,
read before any weight is."""

from __future__ import annotations

from pathlib import Path

import torch

from tokensieve.backbones.hf_checkpoint import checkpoint_config
from tokensieve.errors import TokensieveError

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ONEVISION = "llava_onevision"
NEXT = "llava_next"
NEXT_VIDEO = "llava_next_video"
ANYRES = (NEXT, ONEVISION, NEXT_VIDEO)


def load_backbone(name_or_path: str | Path | None = None, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu"):
    """A :class:`~tokensieve.backbones.hf_llava.LlavaBackbone` (``model_type`` ``llava``; None: the
    shipped testbed), a :class:`~tokensieve.backbones.hf_qwen.QwenVLBackbone` (``qwen2_vl``,
    ``qwen2_5_vl``, ``qwen3_vl``), a :class:`~tokensieve.backbones.hf_llava_next.LlavaNextBackbone`
    (``llava_next``), a :class:`~tokensieve.backbones.hf_llava_onevision.LlavaOnevisionBackbone`
    (``llava_onevision``) or a :class:`~tokensieve.backbones.hf_llava_next_video.LlavaNextVideoBackbone`
    (``llava_next_video``) of the checkpoint ``name_or_path`` (a folder or a hub id)."""
    from tokensieve.backbones.hf_llava import LlavaBackbone

    if name_or_path is None:
        return LlavaBackbone.from_pretrained(None, dtype, device)
    family = checkpoint_config(str(name_or_path)).model_type
    if family in QWEN_FAMILIES:
        from tokensieve.backbones.hf_qwen import QwenVLBackbone

        return QwenVLBackbone.from_pretrained(name_or_path, dtype, device)
    if family == "llava":
        return LlavaBackbone.from_pretrained(name_or_path, dtype, device)
    if family == NEXT:
        from tokensieve.backbones.hf_llava_next import LlavaNextBackbone

        return LlavaNextBackbone.from_pretrained(name_or_path, dtype, device)
    if family == ONEVISION:
        from tokensieve.backbones.hf_llava_onevision import LlavaOnevisionBackbone

        return LlavaOnevisionBackbone.from_pretrained(name_or_path, dtype, device)
    if family == NEXT_VIDEO:
        from tokensieve.backbones.hf_llava_next_video import LlavaNextVideoBackbone

        return LlavaNextVideoBackbone.from_pretrained(name_or_path, dtype, device)
    raise TokensieveError(f"{name_or_path} is a {family!r} model; tokensieve loads LLaVA ('llava'), Qwen-VL "
                          f"({', '.join(map(repr, QWEN_FAMILIES))}), LLaVA-NeXT ({NEXT!r}), LLaVA-OneVision "
                          f"({ONEVISION!r}) and LLaVA-NeXT-Video ({NEXT_VIDEO!r}) checkpoints")


def is_qwen(backbone) -> bool:
    """True for a Qwen-VL adapter: images of any size, a token count per image."""
    return getattr(backbone, "family", None) in QWEN_FAMILIES


def is_onevision(backbone) -> bool:
    """True for a LLaVA-OneVision adapter: its Qwen2 chat format, a token count per image."""
    return getattr(backbone, "model_type", None) == ONEVISION


def is_next(backbone) -> bool:
    """True for a LLaVA-NeXT or LLaVA-NeXT-Video adapter (not OneVision): LLaVA's chat format, or its
    checkpoint's chat template."""
    return getattr(backbone, "model_type", None) in (NEXT, NEXT_VIDEO)


def is_anyres(backbone) -> bool:
    """True for a LLaVA-NeXT, LLaVA-OneVision or LLaVA-NeXT-Video adapter: each image packed from its base and
    crops, a token count per image (newlines included)."""
    return getattr(backbone, "model_type", None) in ANYRES
