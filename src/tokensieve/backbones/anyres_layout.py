"""Where each visual token of a LLaVA-NeXT (anyres) image comes from: the run the model packs from
the image's crops, as pure functions.

LLaVA-NeXT cuts an image into a base crop (the whole image, resized) and ``n_h x n_w`` high-resolution
crops, encodes every crop to a ``g x g`` grid, and packs them into one run per image
(``LlavaNextModel.pack_image_features``, transformers 5.x): the base grid in raster order, then the
crops put side by side into one ``(g*n_h, g*n_w)`` canvas, its letterbox rows or columns cut
(``unpad_image``), read row by row with one ``image_newline`` after every canvas row. The functions
here compute that run's :class:`AnyresLayout` from the image size alone (through the model's own
geometry functions, on index tensors), and pack features by it (:func:`pack_with_layout`), which
gives the model's packed features bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

BASE, NEWLINE = 0, -1  # AnyresLayout.part of the base crop's tokens and of a newline


@dataclass(frozen=True)
class AnyresLayout:
    """One image's packed run of ``N`` tokens, each field ``(N,)`` long (``is_newline`` bool).

    part: 0 the base crop, ``1..n_h*n_w`` a high-resolution crop (row-major over the crop grid),
        -1 a newline.
    row, col: the token's place in its grid: the base crop's own ``g x g`` grid, or the unpadded
        canvas of the high-resolution crops (a newline sits at ``col`` = the canvas width).
    source: the index of the token in the image's crop features flattened ``(n_crops * g*g,)``
        (crop ``c``, patch ``p`` -> ``c*g*g + p``); -1 for a newline.
    is_newline: ``part == -1``.
    n_crops: crops the image was cut into, the base included (its rows of the tower's batch).
    """

    part: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    source: torch.Tensor
    is_newline: torch.Tensor
    n_crops: int

    def __len__(self) -> int:
        return self.part.shape[0]

    @property
    def candidates(self) -> torch.Tensor:
        """``(N - newlines,)`` the positions in the run of the tokens that are not newlines, in order."""
        return (~self.is_newline).nonzero().flatten()


def anyres_layout(image_size, pinpoints: list, crop_size: int, grid: int, newline: bool = True) -> AnyresLayout:
    """The layout of the run LLaVA-NeXT packs for one image of ``image_size`` ``(height, width)``.

    pinpoints: the config's ``image_grid_pinpoints``; crop_size: the vision tower's ``image_size``
    (pixels per crop side); grid: patches per crop side (``crop_size // patch_size``); newline: whether
    the model appends ``image_newline`` to every canvas row (LLaVA-NeXT does).
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
    rows = torch.arange(height)[:, None].expand(height, width + int(newline))
    cols = torch.arange(width + int(newline)).expand(height, -1)
    source = torch.cat([canvas, canvas.new_full((height, 1), NEWLINE)], 1) if newline else canvas
    source, rows, cols = source.flatten(), rows.flatten(), cols.flatten()
    is_newline = source == NEWLINE
    part = torch.where(is_newline, NEWLINE, source // per_crop)
    not_newline = torch.zeros(per_crop, dtype=torch.bool)
    return AnyresLayout(part=torch.cat([torch.full((per_crop,), BASE), part]), row=torch.cat([base // grid, rows]),
                        col=torch.cat([base % grid, cols]), source=torch.cat([base, source]),
                        is_newline=torch.cat([not_newline, is_newline]), n_crops=1 + n_h * n_w)


def pack_with_layout(crops: torch.Tensor, layout: AnyresLayout, newline: torch.Tensor | None) -> torch.Tensor:
    """The packed run ``(N, d)`` of one image: ``crops`` ``(n_crops, g*g, d)`` (base first) gathered by
    ``layout.source``, ``newline`` ``(d,)`` at the newline slots (None: a layout without newlines)."""
    flat = crops.flatten(0, 1)
    if newline is not None:
        flat = torch.cat([flat, newline[None].to(flat.device, flat.dtype)])
    index = torch.where(layout.is_newline, flat.shape[0] - 1, layout.source)
    return flat[index.to(flat.device)]

