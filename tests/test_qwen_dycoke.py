"""DyCoke (stage 1, TTM) on Qwen-VL videos, on the tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: a video of
12 frames of 56x84 px is 6 temporal patches of 2x3 merged tokens, the frames DyCoke compares (not the
authors' site: theirs is LLaVA-OneVision's pooled frames). Its rule itself is checked against the released
code in test_parity_dycoke.py; here, that the adapter hands it each video's frames and applies its choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_fixtures import load_fixture
from tiny_qwen import image, kept_of

from tokensieve.attach import attach
from tokensieve.backbones.qwen_prompt import IMAGE, VIDEO, prompt
from tokensieve.errors import TokensieveError
from tokensieve.methods.dycoke import dycoke_count, ttm_keep

DYCOKE = {"name": "dycoke", "order": "positions"}  # Qwen-VL keeps grid order
KEEP = dycoke_count(6, 6)  # the reference's count at k = 0.3: 2 whole frames and 4 of 4 tokens = 28


def clips(qwen, frames: list[int], with_image: bool = False) -> dict:
    """One row per video of ``frames[i]`` 56x84 frames (random, seeded), the first row led by a 56x84 image
    where ``with_image``."""
    videos = [np.random.default_rng(7 + i).integers(0, 255, (f, 56, 84, 3), dtype=np.uint8)
              for i, f in enumerate(frames)]
    texts = [prompt((IMAGE if with_image and i == 0 else "") + VIDEO + "what is the colour ?", [], qwen.system_prompt)
             for i in range(len(frames))]
    metadata = [{"fps": 2.0, "total_num_frames": f, "frames_indices": list(range(f))} for f in frames]
    return dict(qwen.processor(images=[image("small")] if with_image else None, text=texts, videos=videos,
                               video_metadata=metadata, return_tensors="pt", padding=True))


def test_each_video_keeps_what_dycoke_keeps_of_its_frames(qwen):
    batch = clips(qwen, [12, 12])
    assert batch["video_grid_thw"].tolist() == [[6, 4, 6]] * 2  # 6 temporal patches of 2x3 merged tokens
    handle = attach(qwen, DYCOKE, KEEP, site="llm.0")
    try:
        with torch.no_grad():
            pruned, kept = qwen.forward(**batch).logits, kept_of(handle)
            features = qwen.model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"],
                                                           return_dict=True).pooler_output
    finally:
        handle.detach()
    reference = load_fixture("dycoke")[0]["f6_p6_k03.per_frame"]  # the released code's counts in this geometry
    for video, k in zip(features, kept):
        assert torch.equal(k, ttm_keep(video.reshape(6, 6, -1), KEEP).sort().values)
        assert torch.equal(torch.bincount(k // 6, minlength=6), reference)
    with torch.no_grad():
        assert torch.equal(pruned, qwen.forward(**batch, kept=kept).logits)
        assert not torch.allclose(pruned[:, -1], qwen.forward(**batch).logits[:, -1])


def test_soft_mode_keeps_the_same_tokens(qwen):
    batch, kept = clips(qwen, [12]), {}
    for mode in ("hard", "soft"):
        handle = attach(qwen, DYCOKE, 0.6, site="llm.0", mode=mode)
        try:
            with torch.no_grad():
                qwen.forward(**batch)
        finally:
            handle.detach()
        kept[mode] = kept_of(handle)[0]
    assert len(kept["hard"]) == round(0.6 * 36) and torch.equal(kept["hard"], kept["soft"])


def test_the_references_order_is_refused_at_attach_in_one_line(qwen):
    with pytest.raises(TokensieveError, match='an order of its own .*give it order="positions"') as caught:
        attach(qwen, "dycoke", KEEP)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("frames,with_image,words", [
    ([12], True, "an image; DyCoke prunes videos only"),
    ([4], False, "a video of 2 frames \\(temporal patches on Qwen-VL\\); DyCoke needs an even count"),
    ([10], False, "a video of 5 frames"),
])
def test_images_and_short_or_odd_videos_are_refused_in_the_pass_in_one_line(qwen, frames, with_image, words):
    handle = attach(qwen, DYCOKE, 0.8, site="llm.0")
    try:
        with torch.no_grad(), pytest.raises(TokensieveError, match=words) as caught:
            qwen.forward(**clips(qwen, frames, with_image))
    finally:
        handle.detach()
    assert "\n" not in str(caught.value)
