"""Load a vision-language checkpoint with the adapter of its family, read from its config's ``model_type``:
``llava`` -> :class:`~tokensieve.backbones.hf_llava.LlavaBackbone`; ``qwen2_vl``, ``qwen2_5_vl``,
``qwen3_vl`` -> :class:`~tokensieve.backbones.hf_qwen.QwenVLBackbone` (each refuses other types)."""

from __future__ import annotations

from pathlib import Path

import torch

from tokensieve.backbones.hf_checkpoint import checkpoint_config

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def load_vlm(name: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The adapter of checkpoint ``name`` (a folder or a hub id), its model and processor loaded."""
    if checkpoint_config(str(name)).model_type in QWEN_FAMILIES:
        from tokensieve.backbones.hf_qwen import QwenVLBackbone

        return QwenVLBackbone.from_pretrained(name, dtype=dtype, device=device)
    from tokensieve.backbones.hf_llava import LlavaBackbone

    return LlavaBackbone.from_pretrained(name, dtype=dtype, device=device)
