"""The LLaVA-NeXT-Video adapter on a tiny random model, images (anyres, as LLaVA-NeXT) beside a video: loading
(by model_type too), layouts, exact equality with the plain model, the kept= path, its chat format, and what it
refuses (one line each)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_llava_next import TOKENS
from tiny_next_video import ROWS, VOCAB, image, inputs

from tokensieve.backbones.anyres_tower import CROP_SIGNALS
from tokensieve.backbones.base import Backbone, Site
from tokensieve.backbones.chat_format import encode_samples, prompt_text
from tokensieve.backbones.hf_llava_next_video import LlavaNextVideoBackbone
from tokensieve.backbones.load import load_backbone
from tokensieve.errors import TokensieveError

VIDEO_TOKENS = 4 * 2 * 2  # 4 frames of a 4x4 grid pooled to 2x2, no newline


def positions(batch):
    return (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)


def test_loads_model_processor_and_contract(next_video, tiny_next_video_dir):
    assert isinstance(next_video, Backbone)
    assert type(next_video.processor).__name__ == "LlavaNextVideoProcessor"
    assert type(next_video.processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert next_video.sites() == [Site("llm", k) for k in range(3)]
    assert next_video.signals_at(Site("llm", 0)) == {"projector_input", "anyres_source", *CROP_SIGNALS}
    assert next_video.video_token_id == VOCAB["<video>"]
    assert next_video.most_image_tokens() == 16 + 64  # the base grid and the 2x2 pinpoint's 8x8 canvas
    assert type(load_backbone(tiny_next_video_dir)) is LlavaNextVideoBackbone


def test_layouts_describe_the_models_own_runs(next_video, nv_batch):
    placeholders = ((nv_batch["input_ids"] == next_video.image_token_id)
                    | (nv_batch["input_ids"] == next_video.video_token_id)).sum(1).tolist()  # the processor's count
    assert placeholders == [TOKENS["wide"], VIDEO_TOKENS, TOKENS["tall"]]
    with torch.no_grad():
        runs, layouts = next_video.encode_units(["image", "video", "image"], nv_batch["pixel_values"],
                                                nv_batch["image_sizes"], nv_batch["pixel_values_videos"])
    assert [len(r) for r in runs] == [len(layout) for layout in layouts] == placeholders
    assert [layout.kind for layout in layouts] == ["image", "video", "image"]
    assert not layouts[1].is_newline.any(), "NeXT-Video ends a video with no newline"
    newline = next_video.model.model.image_newline
    for run, layout in zip(runs[::2], layouts[::2]):
        assert torch.equal(run[layout.is_newline], newline.expand(int(layout.is_newline.sum()), -1))


def test_nothing_removed_is_the_plain_model(next_video, nv_batch, nv_plain):
    with torch.no_grad():
        plain = next_video.model(**nv_batch, position_ids=positions(nv_batch)).logits
        assert torch.equal(plain, nv_plain)
        generated = next_video.model.generate(**nv_batch, max_new_tokens=3, do_sample=False)
        ours = next_video.generate(**nv_batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[:, nv_batch["input_ids"].shape[1]:], ours)


def test_kept_shrinks_each_run_and_padded_batch_equals_each_row_alone(next_video, nv_batch):
    wide, tall = (next_video.image_layout(size) for size in nv_batch["image_sizes"].tolist())
    kept = [torch.cat([torch.arange(0, 40, 3), wide.is_newline.nonzero().flatten()]).unique(),
            torch.tensor([0, 5, 6, 11, 15]),
            torch.cat([torch.arange(5, 41, 2), tall.is_newline.nonzero().flatten()]).unique()]
    with torch.no_grad():
        prepared = next_video.prepare(**nv_batch, kept=kept)
        assert (prepared.input_ids == next_video.image_token_id).sum(1).tolist() == [len(k) for k in kept]
        together = next_video.forward(**nv_batch, kept=kept).logits[:, -1]
        for b, row in enumerate(ROWS):
            single = next_video.forward(**inputs(next_video.processor, [row], first=b), kept=kept[b:b + 1]).logits
            torch.testing.assert_close(together[b:b + 1], single[:, -1], rtol=1e-5, atol=1e-5)


def test_chat_format_is_llavas_without_a_template(next_video):
    assert prompt_text(next_video, "what colour ?") == "USER: <image>\nwhat colour ? ASSISTANT:"
    rows = [row for row in ROWS if row[1] != "video"]
    samples = [SimpleNamespace(image=image(size, seed=2 * b), question=q) for b, (q, size) in enumerate(rows)]
    encoded = encode_samples(next_video, samples)
    expected = next_video.processor(images=[s.image for s in samples], text=[prompt_text(next_video, s.question)
                                                                            for s in samples],
                                    return_tensors="pt", padding=True)
    assert torch.equal(encoded["input_ids"], expected["input_ids"])
    assert next_video._questions(encoded["input_ids"], next_video.layout(encoded["input_ids"],
                                                                         encoded["attention_mask"])) == \
        [q for q, _ in rows]


def test_not_a_next_video_checkpoint(tiny_llava_next_dir):
    with pytest.raises(TokensieveError, match="'llava_next' model; the LLaVA-NeXT-Video backbone needs model_type "
                                              "'llava_next_video'"):
        LlavaNextVideoBackbone.from_pretrained(tiny_llava_next_dir)


def test_bad_inputs_are_one_line(next_video, nv_batch):
    with pytest.raises(TokensieveError, match="0 videos given for 1 prompts with a <video> run"):
        next_video.forward(**{k: v for k, v in nv_batch.items() if k != "pixel_values_videos"})
    fewer = dict(nv_batch, pixel_values_videos=nv_batch["pixel_values_videos"][:, :2])
    with pytest.raises(TokensieveError, match="row 1 has 16 <video> tokens for an video of 8 tokens .its frames."):
        next_video.forward(**fewer)
    ids = nv_batch["input_ids"].clone()
    ids[0, -3] = VOCAB["<video>"]  # a video run after row 0's image
    with pytest.raises(TokensieveError, match="one image or video per prompt for now: row 0 has 2 runs"):
        next_video.forward(**dict(nv_batch, input_ids=ids))
