"""DyCoke (stage 1, TTM) at its authors' site: a LLaVA-OneVision video's pooled frames before the LLM, its
kept tokens entering the LLM in the reference's order (whole frames in grid order, a cut frame's tokens by
rising similarity), then the video's one newline. The rule itself is checked against the released code in
test_parity_dycoke.py; here, that the adapter hands it the frames and places its choice as the reference does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_llava_next_pruning import kept_of

from tokensieve.attach import attach
from tokensieve.backbones.onevision_prompt import prompt
from tokensieve.errors import TokensieveError
from tokensieve.methods.dycoke import dycoke_count, ttm_keep

FRAMES, PER_FRAME = 8, 4  # the tiny model pools each 28 px frame to 2x2 tokens
KEEP = dycoke_count(FRAMES, PER_FRAME)  # the reference's count at k = 0.3


def clip(onevision, frames: int = FRAMES, seed: int = 3) -> dict:
    video = np.random.default_rng(seed).integers(0, 255, (frames, 28, 28, 3), dtype=np.uint8)
    return dict(onevision.processor(videos=[video], text=[prompt("what happens ?", "video")], return_tensors="pt"))


def test_the_llm_receives_the_kept_tokens_in_the_references_order_then_the_newline(onevision):
    batch = clip(onevision)
    with torch.no_grad():
        (features,), (layout,) = onevision.encode_units(["video"], None, None, batch["pixel_values_videos"])
        expected = ttm_keep(features[:-1].reshape(FRAMES, PER_FRAME, -1), KEEP)
        handle = attach(onevision, "dycoke", KEEP)
        try:
            prepared = onevision.prepare(**batch)
            kept = kept_of(handle)[0]
        finally:
            handle.detach()
    assert not torch.equal(expected, expected.sort().values), "the reference's order differs from grid order here"
    assert torch.equal(kept, expected)
    visual = prepared.input_ids[0] == onevision.image_token_id
    assert visual.sum() == KEEP + 1
    torch.testing.assert_close(prepared.inputs_embeds[0][visual], features[torch.cat([expected, torch.tensor([-1])])],
                               rtol=0, atol=0)


def test_grid_order_is_ours_and_an_image_is_refused_in_one_line(onevision, ov_batch):
    handle = attach(onevision, {"name": "dycoke", "order": "positions"}, KEEP)
    try:
        with torch.no_grad():
            onevision.forward(**clip(onevision))
            assert torch.equal(kept_of(handle)[0], kept_of(handle)[0].sort().values)
            with pytest.raises(TokensieveError, match="an image; DyCoke prunes videos only") as caught:
                onevision.forward(**ov_batch)
    finally:
        handle.detach()
    assert "\n" not in str(caught.value)
