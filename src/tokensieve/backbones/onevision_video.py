"""Where each visual token of a LLaVA-OneVision video comes from: its run as the model builds it
(``LlavaOnevisionModel.get_video_features``, transformers 5.x).

Every frame goes through the tower as one crop (``g x g`` patches) and the projector, then is pooled
bilinearly to ``ceil(g/2) x ceil(g/2)`` (``apply_pooling``); the frames follow one another, each in
raster order, and one ``image_newline`` ends the whole video: ``F * p * p + 1`` tokens. A pooled token is
a bilinear mix of patches of its frame, so it has no single source patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from tokensieve.method import VisualUnit


@dataclass(frozen=True)
class PooledVideoLayout:
    """One video's run: ``frames`` frames of a ``side x side`` pooled grid (frame-major, then raster), then
    one newline. ``grid``: patches per frame side before pooling (``side = ceil(grid / 2)``)."""

    kind: ClassVar[str] = "video"
    frames: int
    grid: int

    @property
    def side(self) -> int:
        return math.ceil(self.grid / 2)

    @property
    def n_crops(self) -> int:
        """The video's rows of its tower pass: one per frame."""
        return self.frames

    def __len__(self) -> int:
        return self.frames * self.side**2 + 1

    @property
    def is_newline(self) -> torch.Tensor:
        """``(N,)`` bool: the last token only."""
        return torch.arange(len(self)) == len(self) - 1

    @property
    def candidates(self) -> torch.Tensor:
        """``(N - 1,)`` the positions in the run of the frames' tokens (all but the newline)."""
        return torch.arange(len(self) - 1)

    def unit(self, device=None) -> VisualUnit:
        """The run as a :class:`~tokensieve.method.VisualUnit`: ``frames x side x side``, every cell (the
        newline after the last frame lies outside the grid)."""
        return VisualUnit("video", self.frames, self.side, self.side, 0, torch.arange(len(self) - 1, device=device))

    def pack(self, frames: torch.Tensor, newline: torch.Tensor | None = None) -> torch.Tensor:
        """The run ``(N, d)`` from per-frame features ``frames`` ``(F, g*g, d)``: each frame pooled as the
        model pools it, then ``newline`` ``(d,)`` (None: zeros)."""
        grid = frames.view(self.frames, self.grid, self.grid, -1).permute(0, 3, 1, 2).contiguous()
        pooled = F.interpolate(grid, size=[self.side, self.side], mode="bilinear").permute(0, 2, 3, 1)
        end = frames.new_zeros(1, frames.shape[-1]) if newline is None else newline[None].to(frames)
        return torch.cat([pooled.reshape(-1, frames.shape[-1]), end])
