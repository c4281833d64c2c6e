"""A tiny UNTRAINED Qwen testbed saved locally (< 1 s): the testbed's Qwen2.5-VL layout, processor and
scene sizes (64 to 100 visual tokens per image) at the tiny widths, with random weights. Accuracy on it
is meaningless; the per-image token counts, budgets and object cells are those of the real one."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_testbed import TINY

from tokensieve.testbed.qwen_family import QwenTestbed


def save_untrained_qwen_testbed(folder: Path) -> Path:
    """Build the tiny testbed model and processor with seed 0 and save both into ``folder``."""
    torch.manual_seed(0)
    model, processor = QwenTestbed().build(TINY["size"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
