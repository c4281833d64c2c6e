"""Seeded random images and videos for the tiny models' tests (each tiny module names its sizes)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image of ``height x width`` px."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def random_video(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random video: ``(frames, height, width, 3)`` uint8 (its generator offset from the images')."""
    return np.random.default_rng(1000 + seed).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)
