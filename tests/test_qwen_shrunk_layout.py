"""Where the visual runs and the question of a Qwen-VL batch lie once its kept tokens are chosen: found on the
host (:func:`tokensieve.backbones.qwen_layout.shrunk_layout`, no read of values), the layout is the one found in
the shrunk batch's values. Every family, images of several sizes and videos (on Qwen3-VL one run per temporal
patch, one of which goes entirely), rows padded on the left or on the right, every token kept or some."""

from __future__ import annotations

import pytest
import torch
from padding_side import right_padded
from test_qwen_video import KEPT
from test_qwen_video import ROWS as VIDEO_ROWS
from tiny_qwen import inputs

from tokensieve.backbones.qwen_kept import kept_per_run
from tokensieve.backbones.qwen_layout import find_layout, shrunk_layout


@pytest.mark.parametrize("kept", [None, KEPT], ids=["all", "some"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_the_layout_found_on_the_host_is_the_one_in_the_shrunk_batch(qwen, kept, side):
    batch = inputs(qwen, VIDEO_ROWS)
    batch = right_padded(batch) if side == "right" else batch
    layout = qwen.layout(batch["input_ids"], batch["attention_mask"], batch["video_grid_thw"])
    shrunk = qwen.prepare(**batch, kept=kept)
    found = find_layout(shrunk.input_ids, shrunk.attention_mask, qwen.image_token_id, qwen.video_token_id)
    derived = shrunk_layout(layout, None if kept is None else kept_per_run(layout, kept))
    assert [[(r.start, r.count) for r in row] for row in derived.runs] == \
           [[(r.start, r.count) for r in row] for row in found.runs]
    assert torch.equal(derived.question_mask, found.question_mask)
    assert derived.lengths == shrunk.attention_mask.sum(1).tolist() == found.lengths
    if kept is not None and qwen.family == "qwen3_vl":  # video 2's second temporal patch went entirely
        assert sum(len(row) for row in derived.runs) == sum(len(row) for row in layout.runs) - 1
