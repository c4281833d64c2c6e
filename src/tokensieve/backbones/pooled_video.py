"""Where each visual token of a pooled video comes from: its run as LLaVA-OneVision or LLaVA-NeXT-Video builds
it (``get_video_features`` of ``LlavaOnevisionModel`` and ``LlavaNextVideoModel``, transformers 5.x).

Every frame goes through the tower as one crop (``g x g`` patches) and the projector, and is pooled to a
``side x side`` grid, where each model pools it:

* LLaVA-OneVision: after the projector, bilinearly to ``ceil(g/2)`` (``apply_pooling``); one
  ``image_newline`` ends the whole video: ``F * side^2 + 1`` tokens;
* LLaVA-NeXT-Video: before the projector, by its ``vision_resampler`` (2x2 windows, stride 2, to ``g // 2``:
  ``LlavaNextVideoPooler``); no newline: ``F * side^2`` tokens.

The frames follow one another, each in raster order. A pooled token mixes patches of its frame, so it has
no single source patch.
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
    """One video's run: ``frames`` frames of a ``side x side`` pooled grid (frame-major, then raster), then one
    newline where the model ends a video with one. ``grid``: patches per frame side before pooling;
    pooled_before_projector: NeXT-Video's pooling (``side = grid // 2``, the projector's input and output
    already pooled), else OneVision's (``side = ceil(grid / 2)``, the projector's output pooled)."""

    kind: ClassVar[str] = "video"
    frames: int
    grid: int
    pooled_before_projector: bool = False
    newline: bool = True

    @property
    def side(self) -> int:
        return self.grid // 2 if self.pooled_before_projector else math.ceil(self.grid / 2)

    @property
    def n_crops(self) -> int:
        """The video's rows of its tower pass: one per frame."""
        return self.frames

    def __len__(self) -> int:
        return self.frames * self.side**2 + self.newline

    @property
    def is_newline(self) -> torch.Tensor:
        """``(N,)`` bool: the last token where the run ends with a newline, else none."""
        return torch.arange(len(self)) >= self.frames * self.side**2

    @property
    def candidates(self) -> torch.Tensor:
        """``(F * side^2,)`` the positions in the run of the frames' tokens (all but a newline)."""
        return torch.arange(self.frames * self.side**2)

    @property
    def newlines(self) -> torch.Tensor:
        """``(newlines,)`` the position in the run of its newline (the last), or none."""
        return torch.arange(self.frames * self.side**2, len(self))

    def unit(self, device=None) -> VisualUnit:
        """The run as a :class:`~tokensieve.method.VisualUnit`: ``frames x side x side``, every cell (a newline
        after the last frame lies outside the grid)."""
        return VisualUnit("video", self.frames, self.side, self.side, 0, self.candidates.to(device))

    def pack(self, frames: torch.Tensor, newline: torch.Tensor | None = None) -> torch.Tensor:
        """The run ``(N, d)`` from per-frame features as the projector takes them in or gives them out: OneVision's
        ``(F, g*g, d)``, each frame pooled here as the model pools it; NeXT-Video's ``(F, side^2, d)``, pooled
        already. Then ``newline`` ``(d,)`` where the run has one (None: zeros)."""
        if self.pooled_before_projector:
            pooled = frames.reshape(-1, frames.shape[-1])
        else:
            grid = frames.view(self.frames, self.grid, self.grid, -1).permute(0, 3, 1, 2).contiguous()
            pooled = F.interpolate(grid, size=[self.side, self.side], mode="bilinear").permute(0, 2, 3, 1)
            pooled = pooled.reshape(-1, frames.shape[-1])
        if not self.newline:
            return pooled
        end = frames.new_zeros(1, frames.shape[-1]) if newline is None else newline[None].to(frames)
        return torch.cat([pooled, end])
