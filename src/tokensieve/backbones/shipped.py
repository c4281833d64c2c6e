"""Where the testbeds that ship with the package lie, each an ordinary checkpoint folder that
``from_pretrained`` reads."""

from __future__ import annotations

from pathlib import Path

FOLDERS = {"llava": "testbed", "qwen": "qwen_testbed"}  # family -> folder under tokensieve/assets


def shipped_testbed(family: str = "llava") -> Path:
    """The shipped testbed checkpoint of ``family``: ``"llava"`` (the embedded default, a LLaVA-1.5
    architecture) or ``"qwen"`` (a Qwen2.5-VL architecture)."""
    return Path(__file__).resolve().parent.parent / "assets" / FOLDERS[family]
