"""The LLaVA-NeXT anyres layout (backbones/anyres_layout.py) against the model's own packing."""

from __future__ import annotations

import pytest
import torch
from tiny_llava_next import IMAGE_SIZES, NEWLINES, PINPOINTS, TOKENS, config
from transformers import LlavaNextForConditionalGeneration

from tokensieve.backbones.anyres_layout import anyres_layout, pack_with_layout

SIZES = [(40, 80), (80, 40), (56, 56), (28, 28), (20, 80), (90, 30), (50, 61), (61, 50), (100, 100)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config()).model.eval()


def test_packing_by_the_layout_is_the_models_own_bit_for_bit(model):
    """Several sizes in one batch (wide, tall, square, odd): per image, the crops gathered by the layout
    are exactly what ``pack_image_features`` gives, newlines included."""
    layouts = [anyres_layout(size, PINPOINTS, 28, 4) for size in SIZES]
    crops = [torch.randn(layout.n_crops, 16, 32) for layout in layouts]
    packed, lengths = model.pack_image_features(crops, torch.tensor(SIZES), "default", model.image_newline)
    assert lengths.tolist() == [len(layout) for layout in layouts]
    for theirs, c, layout in zip(packed, crops, layouts):
        assert torch.equal(pack_with_layout(c, layout, model.image_newline), theirs)
    # the newline's own vector sits exactly where the layout says
    for theirs, layout in zip(packed, layouts):
        assert torch.equal(theirs[layout.is_newline], model.image_newline.expand(int(layout.is_newline.sum()), -1))


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_fields_of_the_tiny_images(size):
    layout = anyres_layout(IMAGE_SIZES[size], PINPOINTS, 28, 4)
    assert len(layout) == TOKENS[size] and int(layout.is_newline.sum()) == NEWLINES[size]
    assert torch.equal(layout.part[:16], torch.zeros(16, dtype=torch.long))
    assert torch.equal(layout.source[:16], torch.arange(16))
    assert torch.equal(layout.row[:16] * 4 + layout.col[:16], torch.arange(16))
    canvas = ~layout.is_newline & (torch.arange(len(layout)) >= 16)
    # newlines end every canvas row, at column = the canvas width
    width = int(layout.col[canvas].max()) + 1
    assert (layout.col[layout.is_newline] == width).all() and (layout.source[layout.is_newline] == -1).all()
    assert torch.equal(layout.part == -1, layout.is_newline)
    # each canvas token's crop: part = source // 16, and its place in that crop agrees with (row, col)
    src = layout.source[canvas]
    assert torch.equal(layout.part[canvas], src // 16) and layout.part[canvas].min() >= 1
    assert len(layout.candidates) == TOKENS[size] - NEWLINES[size]


def test_wide_image_rows_and_newline_positions():
    """40x80 at 1x2 crops: a 4x8 canvas, nothing cut, newlines at 24, 33, 42, 51 (the study's probe)."""
    layout = anyres_layout((40, 80), PINPOINTS, 28, 4)
    assert layout.n_crops == 3
    assert layout.is_newline.nonzero().flatten().tolist() == [24, 33, 42, 51]
    assert layout.source[16:24].tolist() == [16, 17, 18, 19, 32, 33, 34, 35]  # crop 1's row 0, crop 2's row 0


def test_letterbox_rows_are_cut():
    """20x80 at 1x2 crops: the image fills 2 of the canvas's 4 rows (20 * 8/80), so rows 0 and 3 are cut."""
    layout = anyres_layout((20, 80), PINPOINTS, 28, 4)
    assert len(layout) == 16 + 2 * 9
    assert layout.source[16:24].tolist() == [20, 21, 22, 23, 36, 37, 38, 39]  # crops' row 1
    assert layout.row[16:].unique().tolist() == [0, 1]
