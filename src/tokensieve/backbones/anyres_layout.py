"""Where each visual token of a LLaVA-NeXT (anyres) image comes from: the run the model packs from
the image's crops, as pure functions.

LLaVA-NeXT cuts an image into a base crop (the whole image, resized) and ``n_h x n_w`` high-resolution
crops, encodes every crop to a ``g x g`` grid, and packs them into one run per image
(``LlavaNextModel.pack_image_features``, transformers 5.x): the base grid in raster order, then the
crops put side by side into one ``(g*n_h, g*n_w)`` canvas, its letterbox rows or columns cut
(``unpad_image``), read row by row with one ``image_newline`` after every canvas row. LLaVA-OneVision
(``anyres_max_N``) packs alike, but first interpolates a canvas of more than about ``N`` crops' tokens
down, bilinearly (``LlavaOnevisionModel.pack_image_features``): its tokens are then mixes of crop
patches, not patches. The functions here compute that run's :class:`AnyresLayout` from the image size
alone (through the model's own geometry functions, on index tensors), and pack features by it
(:func:`pack_with_layout`), which gives the model's packed features bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch.nn import functional as F
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from tokensieve.method import VisualUnit

BASE, NEWLINE = 0, -1  # AnyresLayout.part of the base crop's tokens and of a newline


@dataclass(frozen=True)
class AnyresLayout:
    """One image's packed run of ``N`` tokens, each field ``(N,)`` long (``is_newline`` bool).

    part: 0 the base crop, ``1..n_h*n_w`` a high-resolution crop (row-major over the crop grid),
        -1 a newline.
    row, col: the token's place in its grid: the base crop's own ``g x g`` grid, or the unpadded
        canvas of the high-resolution crops (a newline sits at ``col`` = the canvas width); on a resampled
        canvas, its place in the interpolated one.
    source: the index of the token in the image's crop features flattened ``(n_crops * g*g,)``
        (crop ``c``, patch ``p`` -> ``c*g*g + p``); -1 for a newline and for a token of a resampled
        canvas (a bilinear mix of patches; its ``part`` is then the crop of its nearest patch).
    is_newline: ``part == -1``.
    n_crops: crops the image was cut into, the base included (its rows of the tower's batch).
    resampled_from: None, or ``(H, W)`` the source indices of the unpadded canvas that LLaVA-OneVision
        interpolated bilinearly to the ``(h, w)`` canvas the other fields describe.
    """

    kind: ClassVar[str] = "image"
    part: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    source: torch.Tensor
    is_newline: torch.Tensor
    n_crops: int
    resampled_from: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.part.shape[0]

    def unit(self, device=None) -> VisualUnit:
        """The run as a :class:`~tokensieve.method.VisualUnit`: one frame of one row of all its positions
        (base, canvas and newlines in the model's order; an anyres image is not one grid, the fields
        here say where each position lies)."""
        return VisualUnit("image", 1, 1, len(self), 0, torch.arange(len(self), device=device))

    def pack(self, crops: torch.Tensor, newline: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`pack_with_layout` of ``crops`` ``(n_crops, g*g, d)`` by this layout."""
        return pack_with_layout(crops, self, newline)

    @cached_property
    def candidates(self) -> torch.Tensor:
        """``(N - newlines,)`` the positions in the run of the tokens that are not newlines, in order (on
        the host, as every field: read once per layout)."""
        return (~self.is_newline).nonzero().flatten()

    @cached_property
    def parts(self) -> list[torch.Tensor]:
        """Per part (the base crop, then each high-resolution crop), the indices among :attr:`candidates` of
        its tokens, in order."""
        part = self.part[self.candidates]
        return [(part == p).nonzero().flatten() for p in range(self.n_crops)]

    @cached_property
    def newlines(self) -> torch.Tensor:
        """``(newlines,)`` the positions in the run of its newlines, in order."""
        return self.is_newline.nonzero().flatten()


def anyres_layout(image_size, pinpoints: list, crop_size: int, grid: int, newline: bool = True,
                  max_patches: int | None = None) -> AnyresLayout:
    """The layout of the run LLaVA-NeXT (or LLaVA-OneVision) packs for one image of ``image_size``
    ``(height, width)``.

    pinpoints: the config's ``image_grid_pinpoints``; crop_size: the vision tower's ``image_size``
    (pixels per crop side); grid: patches per crop side (``crop_size // patch_size``); newline: whether
    the model appends ``image_newline`` to every canvas row (both do); max_patches: LLaVA-OneVision's
    ``N`` of ``vision_aspect_ratio`` ``anyres_max_N`` (None: LLaVA-NeXT, no interpolation).
    """
    size = [int(s) for s in image_size]
    n_h, n_w = get_anyres_image_grid_shape(size, pinpoints, crop_size)
    per_crop = grid * grid
    base = torch.arange(per_crop)
    # The canvas as the model builds it, of source indices instead of features: crops (n_h, n_w, g, g)
    # -> (g*n_h, g*n_w), then cut by the model's own unpad_image.
    crops = torch.arange(per_crop, (1 + n_h * n_w) * per_crop).view(n_h, n_w, grid, grid)
    canvas = unpad_image(crops.permute(0, 2, 1, 3).reshape(1, n_h * grid, n_w * grid), size)[0]
    height, width = canvas.shape
    resampled_from, size = None, _resampled_size(height, width, grid, max_patches)
    if size is not None:  # OneVision: the canvas interpolated; each token's part is its nearest patch's crop
        resampled_from, nearest = canvas, F.interpolate(canvas[None, None].double(), size, mode="nearest")[0, 0]
        canvas, (height, width) = torch.full(size, NEWLINE), size
    rows = torch.arange(height)[:, None].expand(height, width + int(newline))
    cols = torch.arange(width + int(newline)).expand(height, -1)
    source = torch.cat([canvas, canvas.new_full((height, 1), NEWLINE)], 1) if newline else canvas
    source, rows, cols = source.flatten(), rows.flatten(), cols.flatten()
    is_newline = cols == width
    part = torch.where(is_newline, NEWLINE, source // per_crop)
    if resampled_from is not None:
        near = nearest.long() // per_crop
        part = torch.where(is_newline, NEWLINE, near[rows.clamp(max=height - 1), cols.clamp(max=width - 1)])
    not_newline = torch.zeros(per_crop, dtype=torch.bool)
    return AnyresLayout(part=torch.cat([torch.full((per_crop,), BASE), part]), row=torch.cat([base // grid, rows]),
                        col=torch.cat([base % grid, cols]), source=torch.cat([base, source]),
                        is_newline=torch.cat([not_newline, is_newline]), n_crops=1 + n_h * n_w,
                        resampled_from=resampled_from)


def _resampled_size(height: int, width: int, grid: int, max_patches: int | None) -> tuple[int, int] | None:
    """The ``(h, w)`` LLaVA-OneVision interpolates an unpadded ``height x width`` canvas to, None where it
    keeps it: the model's own arithmetic (ratio over ``max_patches`` crops' tokens, kept up to 1.1)."""
    if max_patches is None:
        return None
    ratio = math.sqrt(height * width / (max_patches * grid**2))
    return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else None


def pack_with_layout(crops: torch.Tensor, layout: AnyresLayout, newline: torch.Tensor | None) -> torch.Tensor:
    """The packed run ``(N, d)`` of one image: ``crops`` ``(n_crops, g*g, d)`` (base first) gathered by
    ``layout.source``, a resampled canvas interpolated from them as the model does it, and ``newline``
    ``(d,)`` at the newline slots (None: zeros there)."""
    flat = crops.flatten(0, 1)
    table = [flat]  # the rows the run is gathered from: patches, the resampled canvas, the newline
    index = layout.source
    if layout.resampled_from is not None:
        canvas = flat[layout.resampled_from.flatten().to(flat.device)].unflatten(0, layout.resampled_from.shape)
        canvas = canvas.permute(2, 0, 1).contiguous()  # (d, H, W), as the model holds it when it interpolates
        resampled = ~layout.is_newline & (layout.part != BASE)
        size = (int(layout.row[resampled].max()) + 1, int(layout.col[resampled].max()) + 1)
        table.append(F.interpolate(canvas[None], size, mode="bilinear")[0].flatten(1).T)  # (h*w, d), row-major
        index = torch.where(resampled, len(flat) + layout.row * size[1] + layout.col, index)
    table.append(flat.new_zeros(1, flat.shape[1]) if newline is None else newline[None].to(flat.device, flat.dtype))
    index = torch.where(layout.is_newline, sum(len(t) for t in table) - 1, index)
    return torch.cat(table)[index.to(flat.device)]
