"""A short video on the LLaVA-OneVision adapter (4 frames of 2x2 pooled tokens and one newline), in a batch with
an image: exact equality with the plain model, the video as methods see it (``SiteInputs.units``: frames x rows
x cols, so a method can choose per frame), methods that declare ``handles_video`` at ``llm.0`` and ``llm.k``,
the row alone as in the batch, and any other method refused in one line in the pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from test_llava_next_pruning import kept_of
from tiny_onevision import VOCAB, inputs

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs

ROWS = [("what happens ?", "video"), ("what colour ?", "wide")]  # 16 frame tokens + 1 newline; 48 + 4 newlines
STAGES = {"random": ("random", "llm.0"), "divprune": ("divprune", "llm.0"), "fastv": ("fastv", "llm.1"),
          "dart": ({"name": "dart", "exact_budget": True}, "llm.1")}


@dataclass
class FirstOfEachFrame(Method):
    """Keeps the first remaining token of every frame of a video (a quarter of its 4 x 2x2 tokens), reading
    ``SiteInputs.units``; of an image, its first tokens."""

    name = "first_of_each_frame"
    stages = ("llm",)
    handles_video = True
    seen: list = field(default_factory=list)

    def select(self, inputs: SiteInputs) -> Selection:
        (unit,) = inputs.units[0]
        self.seen.append(unit)
        if unit.kind != "video":  # the image: its first tokens
            return Selection(torch.arange(inputs.keep)[None])
        frame = unit.cells // (unit.rows * unit.cols)
        first = torch.cat([(frame == f).nonzero()[:1].flatten() for f in range(unit.frames)])
        return Selection((unit.start + first)[None])


@pytest.fixture(scope="module")
def video_batch(onevision):
    return inputs(onevision.processor, ROWS)


def test_nothing_removed_is_the_plain_model(onevision, video_batch):
    assert (video_batch["input_ids"] == VOCAB["<video>"]).sum(1).tolist() == [4 * 2 * 2 + 1, 0]
    positions = (video_batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        assert torch.equal(onevision.forward(**video_batch).logits,
                           onevision.model(**video_batch, position_ids=positions).logits)
        plain = onevision.model.generate(**video_batch, max_new_tokens=3, do_sample=False)
        assert torch.equal(plain[:, video_batch["input_ids"].shape[1]:],
                           onevision.generate(**video_batch, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("site", ["llm.0", "llm.1"])
def test_a_method_sees_the_frames_and_can_choose_per_frame(onevision, video_batch, site):
    method = FirstOfEachFrame()
    handle = attach(onevision, method, 0.25, site=site)
    try:
        with torch.no_grad():
            onevision.forward(**video_batch)
        video, still = method.seen[0], kept_of(handle)[0]
    finally:
        handle.detach()
    assert (video.kind, video.frames, video.rows, video.cols) == ("video", 4, 2, 2)
    assert torch.equal(video.cells, torch.arange(16)), "every frame token, the trailing newline outside the grid"
    assert method.seen[1].kind == "image"
    assert still.tolist() == [0, 4, 8, 12]  # the first token of each frame, as positions in the video's run


@pytest.mark.parametrize("method", STAGES)
def test_video_methods_run_and_the_row_alone_is_as_in_the_batch(onevision, video_batch, method):
    spec, site = STAGES[method]
    handle = attach(onevision, spec, 0.5, site=site)
    try:
        with torch.no_grad():
            prepared = onevision.prepare(**video_batch)
            together, kept = onevision.forward(**video_batch).logits[:, -1], kept_of(handle)
            assert [len(k) for k in kept] == [8, 24]
            assert int(kept[0].max()) < 16, "the video's newline is never a candidate"
            if site == "llm.0":  # the kept frame tokens and the video's one newline enter the LLM
                assert (prepared.input_ids == onevision.image_token_id).sum(1).tolist() == [8 + 1, 24 + 4]
            for b, row in enumerate(ROWS):
                single = onevision.forward(**inputs(onevision.processor, [row], first=b)).logits[:, -1]
                torch.testing.assert_close(together[b:b + 1], single, rtol=1e-5, atol=1e-5)
                assert torch.equal(kept[b], kept_of(handle)[0])
    finally:
        handle.detach()


@pytest.mark.parametrize("site", ["llm.0", "llm.1"])
def test_a_method_without_handles_video_is_refused_in_the_pass(onevision, video_batch, ov_batch, site):
    handle = attach(onevision, "layer_pruner", 0.5, site=site)
    try:
        with torch.no_grad():
            onevision.forward(**ov_batch)  # images only: it runs
            with pytest.raises(TokensieveError, match="row 0 holds a video, which layer_pruner cannot take") as err:
                onevision.forward(**video_batch)
        assert "\n" not in str(err.value)
    finally:
        handle.detach()


def test_video_inputs_that_do_not_match_are_one_line(onevision, video_batch):
    with pytest.raises(TokensieveError, match="0 videos given for 1 prompts with a <video> run"):
        onevision.forward(**{k: v for k, v in video_batch.items() if k != "pixel_values_videos"})
    fewer = dict(video_batch, pixel_values_videos=video_batch["pixel_values_videos"][:, :2])
    with pytest.raises(TokensieveError, match="row 0 has 17 <video> tokens for an video of 9 tokens .its frames."):
        onevision.forward(**fewer)
