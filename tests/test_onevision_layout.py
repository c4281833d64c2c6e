"""LLaVA-OneVision's runs (anyres-max images, pooled videos) as backbones/anyres_layout.py and
backbones/pooled_video.py describe them, against the model's own packing and pooling, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_onevision import ASPECT, PINPOINTS, config
from transformers import LlavaOnevisionForConditionalGeneration

from tokensieve.backbones.anyres_layout import anyres_layout, pack_with_layout
from tokensieve.backbones.pooled_video import PooledVideoLayout

# Kept (20x40: a 4x8 canvas; 40x20; 28x28), interpolated (56x56: 8x8 -> 5x5; 30x90: 4x12 -> 3x9; 40x80: 3x3 crops
# letterboxed to 6x12 -> 4x8; 84x84, 100x100), letterboxed and odd sizes.
SIZES = [(20, 40), (40, 20), (40, 80), (56, 56), (30, 90), (90, 30), (84, 84), (100, 100), (20, 80), (50, 61),
         (61, 50), (28, 28), (84, 30)]
MAX = int(ASPECT.removeprefix("anyres_max_"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(config()).model.eval()


def layout_of(size):
    return anyres_layout(size, PINPOINTS, 28, 4, max_patches=MAX)


def test_packing_by_the_layout_is_the_models_own_bit_for_bit(model):
    """Per image, the crops packed by the layout (gathered, the canvas interpolated where the model does)
    are exactly what ``pack_image_features`` gives, newlines included."""
    layouts = [layout_of(size) for size in SIZES]
    crops = [torch.randn(layout.n_crops, 16, 32) for layout in layouts]
    packed, lengths = model.pack_image_features(crops, torch.tensor(SIZES), model.image_newline, ASPECT)
    assert lengths.tolist() == [len(layout) for layout in layouts]
    assert sum(layout.resampled_from is not None for layout in layouts) >= 5, "most sizes here are interpolated"
    for theirs, c, layout in zip(packed, crops, layouts):
        assert torch.equal(pack_with_layout(c, layout, model.image_newline), theirs)


def test_an_interpolated_canvas_has_no_source_patch():
    """56x56 at 2x2 crops: an 8x8 canvas, ratio sqrt(64 / 32) > 1.1, interpolated to 5x5 (the model's own
    int(8 // 1.414)): 16 base tokens, then 5 rows of 5 tokens and a newline."""
    layout = layout_of((56, 56))
    assert len(layout) == 16 + 5 * 6 and layout.resampled_from.shape == (8, 8)
    canvas = ~layout.is_newline & (torch.arange(len(layout)) >= 16)
    assert (layout.source[canvas] == -1).all() and (layout.source[:16] == torch.arange(16)).all()
    assert layout.row[canvas].max() == 4 and layout.col[canvas].max() == 4
    assert (layout.col[layout.is_newline] == 5).all()
    # each resampled token's part: the crop of its nearest patch (top-left quadrant -> crop 1, ...)
    parts = layout.part[canvas].view(5, 5)
    assert parts[0, 0] == 1 and parts[0, 4] == 2 and parts[4, 0] == 3 and parts[4, 4] == 4
    assert len(layout.candidates) == 16 + 25


def test_a_canvas_within_the_bound_is_kept_as_on_llava_next():
    """20x40 at 1x2 crops: a 4x8 canvas of 32 tokens, ratio 1: gathered patches, as LLaVA-NeXT packs it."""
    ours, next_ = layout_of((20, 40)), anyres_layout((20, 40), PINPOINTS, 28, 4)
    assert ours.n_crops == 3 and len(ours) == 16 + 4 * 9
    assert ours.resampled_from is None
    for field in ("part", "row", "col", "source", "is_newline"):
        assert torch.equal(getattr(ours, field), getattr(next_, field))


def test_video_pooling_by_the_layout_is_the_models_own(model):
    """A video's frames through tower and projector, pooled by the layout, equal ``get_video_features``:
    ``F`` frames of ``ceil(4 / 2) = 2`` x 2 tokens and one newline."""
    frames = torch.randn(2, 3, 3, 28, 28)  # two videos of three frames
    with torch.no_grad():
        theirs = model.get_video_features(frames, return_dict=True).pooler_output  # (2, 3*4 + 1, d)
        tower = model.vision_tower(frames.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
        projected = model.multi_modal_projector(tower).unflatten(0, (2, 3))
    layout = PooledVideoLayout(3, 4)
    assert len(layout) == 3 * 4 + 1 == theirs.shape[1] and layout.side == math.ceil(4 / 2)
    for video, run in zip(projected, theirs):
        assert torch.equal(layout.pack(video, model.image_newline), run)
    unit = layout.unit()
    assert (unit.kind, unit.frames, unit.rows, unit.cols) == ("video", 3, 2, 2)
    assert torch.equal(unit.cells, layout.candidates) and layout.is_newline.nonzero().flatten().tolist() == [12]
