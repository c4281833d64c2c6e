"""DyCoke (stage 1, TTM) on LLaVA-NeXT-Video: a video's pooled frames before the LLM (the site its authors use
on OneVision: test_onevision_dycoke.py), its kept tokens entering the LLM in the reference's order (whole frames
in grid order, a cut frame's tokens by rising similarity), with no newline after them (NeXT-Video has none)."""

from __future__ import annotations

import pytest
import torch
from test_llava_next_pruning import kept_of
from tiny_next_video import inputs

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.methods.dycoke import dycoke_count, ttm_keep

FRAMES, PER_FRAME = 8, 4  # the tiny model pools each 28 px frame's 4x4 patches to 2x2 tokens
KEEP = dycoke_count(FRAMES, PER_FRAME)  # the reference's count at k = 0.3
CLIP = [("what happens ?", "video")]


def test_the_llm_receives_the_kept_tokens_in_the_references_order(next_video):
    batch = inputs(next_video.processor, CLIP, first=3, frames=FRAMES)
    with torch.no_grad():
        (features,), (layout,) = next_video.encode_units(["video"], None, None, batch["pixel_values_videos"])
        expected = ttm_keep(features.reshape(FRAMES, PER_FRAME, -1), KEEP)
        handle = attach(next_video, "dycoke", KEEP)
        try:
            prepared = next_video.prepare(**batch)
            kept = kept_of(handle)[0]
        finally:
            handle.detach()
    assert len(layout) == FRAMES * PER_FRAME
    assert not torch.equal(expected, expected.sort().values), "the reference's order differs from grid order here"
    assert torch.equal(kept, expected)
    visual = prepared.input_ids[0] == next_video.image_token_id
    assert visual.sum() == KEEP
    torch.testing.assert_close(prepared.inputs_embeds[0][visual], features[expected], rtol=0, atol=0)


def test_grid_order_is_ours_and_an_image_is_refused_in_one_line(next_video, nv_batch):
    handle = attach(next_video, {"name": "dycoke", "order": "positions"}, KEEP)
    try:
        with torch.no_grad():
            next_video.forward(**inputs(next_video.processor, CLIP, first=3, frames=FRAMES))
            assert torch.equal(kept_of(handle)[0], kept_of(handle)[0].sort().values)
            with pytest.raises(TokensieveError, match="an image; DyCoke prunes videos only") as caught:
                next_video.forward(**nv_batch)
    finally:
        handle.detach()
    assert "\n" not in str(caught.value)
