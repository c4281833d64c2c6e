"""Pruning stages on the LLaVA-NeXT-Video adapter, on the tiny random NeXT-Video with a wide image, a video of
4 frames and a tall image in one batch: ``llm.0`` (each image's or video's run, chosen alone) with random and
DivPrune, ``llm.k`` (per row) with FastV and DART. Image newlines are never candidates and always enter the
LLM; a video has none. A method sees the video as ``frames x rows x cols`` and can choose per frame. A padded batch
against each row alone, and generate with the cache, for every method: test_family_contract.py."""

from __future__ import annotations

import pytest
import torch
from test_llava_next_pruning import kept_of
from test_onevision_video import FirstOfEachFrame
from tiny_next_video import ROWS, inputs

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError

CANDIDATES = [48, 16, 48]  # 52 - 4 newlines, 4 frames x 2x2, 56 - 8 newlines
HALF = [24, 8, 24]
NEWLINES = [4, 0, 8]
STAGES = {"random": ("random", "llm.0"), "divprune": ("divprune", "llm.0"), "fastv": ("fastv", "llm.1"),
          "dart": ({"name": "dart", "exact_budget": True}, "llm.1")}


def layouts_of(next_video, batch) -> list:
    wide, tall = (next_video.image_layout(size) for size in batch["image_sizes"].tolist())
    return [wide, next_video.video_layout(batch["pixel_values_videos"].shape[1]), tall]


@pytest.mark.parametrize("method", STAGES)
def test_keep_all_budgets_per_unit_and_detach(next_video, nv_batch, nv_plain, method):
    spec, site = STAGES[method]
    with torch.no_grad():
        handle = attach(next_video, spec, 1.0, site=site)
        assert torch.equal(next_video.forward(**nv_batch).logits, nv_plain), "keep-all is the plain model"
        handle.detach()
        handle = attach(next_video, spec, 0.5, site=site)
        prepared = next_video.prepare(**nv_batch)
        pruned = next_video.forward(**nv_batch).logits
        kept = kept_of(handle)
        assert [len(k) for k in kept] == HALF
        for k, layout in zip(kept, layouts_of(next_video, nv_batch)):
            assert not layout.is_newline[k].any(), "newlines are never candidates"
        if site == "llm.0":  # the kept tokens and every image newline enter the LLM
            assert (prepared.input_ids == next_video.image_token_id).sum(1).tolist() == \
                [h + n for h, n in zip(HALF, NEWLINES)]
        dropped = torch.tensor([c - h for c, h in zip(CANDIDATES, HALF)])
        length = int((nv_batch["attention_mask"].sum(1) - dropped).max()) if site == "llm.0" else \
            nv_plain.shape[1] - int(dropped.min())
        assert pruned.shape[1] == length
        with handle.disabled():
            assert torch.equal(next_video.forward(**nv_batch).logits, nv_plain)
        handle.detach()
        assert torch.equal(next_video.forward(**nv_batch).logits, nv_plain), "detach restores the model bit for bit"
        handle = attach(next_video, spec, 10, site=site)
        next_video.forward(**nv_batch)
        assert [len(k) for k in kept_of(handle)] == [10, 10, 10]
        handle.detach()


@pytest.mark.parametrize("site", ["llm.0", "llm.1"])
def test_a_method_sees_the_frames_and_can_choose_per_frame(next_video, nv_batch, site):
    method = FirstOfEachFrame()
    handle = attach(next_video, method, 0.25, site=site)
    try:
        with torch.no_grad():
            next_video.forward(**nv_batch)
        video, still = method.seen[1], kept_of(handle)[1]
    finally:
        handle.detach()
    assert (video.kind, video.frames, video.rows, video.cols) == ("video", 4, 2, 2)
    assert torch.equal(video.cells, torch.arange(16)), "every frame token; no newline"
    assert [unit.kind for unit in method.seen] == ["image", "video", "image"]
    assert still.tolist() == [0, 4, 8, 12]  # the first token of each frame, as positions in the video's run


@pytest.mark.parametrize(("method", "site"), [("layer_pruner", "llm.0"), ("layer_pruner", "llm.1"),
                                              ("hired", "llm.0")])
def test_an_image_only_method_runs_on_images_and_is_refused_on_a_video_in_one_line(next_video, nv_batch, method,
                                                                                   site):
    images = [row for row in ROWS if row[1] != "video"]
    handle = attach(next_video, method, 0.5, site=site)
    try:
        with torch.no_grad():
            next_video.forward(**inputs(next_video.processor, images))  # images only: it runs
            with pytest.raises(TokensieveError, match=f"row 1 holds a video, which {method} cannot take") as err:
                next_video.forward(**nv_batch)
    finally:
        handle.detach()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("split", ["even", "hired"])
def test_a_split_runs_on_images_and_refuses_a_video(next_video, nv_batch, split):
    """Both splits of LLaVA-NeXT (HiRED's reads the base image's CLS attention, which CLIP has); HiRED's rule
    rounds its shares, so an image may keep fewer."""
    handle = attach(next_video, "random", 6, site="llm.0", split=split)
    try:
        with torch.no_grad():
            next_video.forward(**inputs(next_video.processor, [ROWS[0], ROWS[2]]))
            counts = [len(k) for k in kept_of(handle)]
            assert counts == [6, 6] if split == "even" else 1 <= min(counts) <= max(counts) <= 6
            with pytest.raises(TokensieveError, match="row 1 holds a video, which has none: give split 'all'"):
                next_video.forward(**nv_batch)
    finally:
        handle.detach()
