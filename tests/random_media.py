"""Seeded random images and videos for the tiny models' tests (each tiny module names its sizes)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def seed_of(first, row: int) -> int:
    """The seed of row ``row``'s media: ``first + row``, or ``first[row]`` where ``first`` lists every row's
    (the same seed twice: the same image twice)."""
    return first[row] if isinstance(first, (list, tuple)) else first + row


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image of ``height x width`` px."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def random_video(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random video: ``(frames, height, width, 3)`` uint8 (its generator offset from the images')."""
    return np.random.default_rng(1000 + seed).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)


def write_video(path, frames: np.ndarray, fps: int = 4):
    """``frames`` ``(T, H, W, 3)`` uint8 written to ``path`` as an MPEG-4 file (PyAV), as a video task holds it;
    returns ``path``."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
