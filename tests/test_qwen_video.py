"""Video on the Qwen-VL adapter, on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: a short video
(4 frames of 56x84 px: 2 temporal patches of 2x3 merged tokens) alone, after an image, and in a batch
with image-only rows; the kept= path, stages at llm.0 (per image or video) and llm.k (per row), the
layout methods see, and methods that do not take video."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_clip_text import save_tiny_clip
from tiny_qwen import inputs, kept_of, until_eos

from tokensieve.attach import attach
from tokensieve.backbones.qwen_prompt import image_questions
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs

# Units in prompt order over the batch: video 0 (12 tokens), image 1 (6), video 2 (12), image 3 (16).
ROWS = [("what is the colour ?", ["video"]), ("what shape is left and right ?", ["small", "video"]),
        ("what is the shape ?", ["big"])]
COUNTS = [12, 6, 12, 16]
# Video 2 keeps tokens of its first temporal patch only: on Qwen3-VL its second frame run goes entirely.
KEPT = [torch.tensor([0, 5, 6, 11]), torch.tensor([1, 2, 4]), torch.tensor([1, 2, 4]), torch.arange(0, 16, 3)]
SUPPRESSED = ("image_token_id", "video_token_id")  # placeholders would read as visual tokens in an answer


@dataclass
class Spy(Method):
    """Keeps the first ``keep`` tokens; records the units it was shown."""

    name = "spy"
    handles_video = True
    seen: list = None

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen.append(inputs.units)
        return Selection(torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1))


@dataclass
class MergerInputSpy(Spy):
    """Also reads the patch merger's input behind each token (what CDPruner reads)."""

    name = "merger_input_spy"
    signals = ("projector_input",)

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen.append((inputs.tokens, inputs.signal("projector_input")))
        return Selection(torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1))


@dataclass
class GridOnly(Method):
    """A method that does not declare handles_video."""

    name = "grid_only"

    def select(self, inputs: SiteInputs) -> Selection:
        return Selection(torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1))


@pytest.fixture(scope="module")
def clips(qwen):
    return inputs(qwen, ROWS)


@pytest.fixture(scope="module")
def plain_clips(qwen, clips):
    with torch.no_grad():
        return qwen.model(**clips).logits


def full_positions(qwen, batch):
    """``(3, B, L)`` the model's own M-RoPE ids of the full prompts."""
    return qwen.model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch.get("second_per_grid_ts"),
        attention_mask=batch["attention_mask"])[0]


def masked_reference(qwen, batch, kept):
    """The model itself with every token present and the dropped visual columns masked out."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = torch.cat([(mask.cumsum(-1) - 1).clamp(min=0)[None], full_positions(qwen, batch)])
    soft = mask.clone()
    for b, row in enumerate(qwen.layout(ids, mask, batch["video_grid_thw"]).runs):
        for run in row:
            dropped = torch.ones(COUNTS[run.unit], dtype=torch.bool)
            dropped[kept[run.unit]] = False
            soft[b, run.start + dropped[run.offset: run.offset + run.count].nonzero().flatten()] = 0
    return dict(batch, attention_mask=soft, position_ids=positions)


def suppressed(qwen) -> list[int]:
    return [getattr(qwen.config, name) for name in SUPPRESSED] + [qwen.config.text_config.eos_token_id]


def test_layout_has_one_unit_per_image_or_video(qwen, clips):
    assert clips["video_grid_thw"].tolist() == [[2, 4, 6]] * 2  # 4 frames -> 2 temporal patches
    layout = qwen.layout(clips["input_ids"], clips["attention_mask"], clips["video_grid_thw"])
    assert layout.kinds == ["video", "image", "video", "image"] and layout.units == [[0], [1, 2], [3]]
    questions = [q for q, visuals in ROWS for _ in visuals]  # each unit's: its row's
    assert image_questions(qwen.processor.tokenizer, clips["input_ids"], layout) == questions
    ids = clips["input_ids"]
    for unit, kind in ((0, "video"), (2, "video")):
        runs = [r for row in layout.runs for r in row if r.unit == unit]
        if qwen.family == "qwen3_vl":  # one run per temporal patch, its timestamp text between them
            assert [(r.count, r.offset) for r in runs] == [(6, 0), (6, 6)]
            assert runs[1].start - runs[0].start > 6
        else:
            assert [(r.count, r.offset) for r in runs] == [(12, 0)]
        row = 0 if unit == 0 else 1
        for run in runs:
            assert (ids[row, run.start: run.start + run.count] == qwen.video_token_id).all()


def test_nothing_kept_out_is_the_plain_model(qwen, clips, plain_clips):
    assert (clips["attention_mask"] == 0).any(), "the batch must actually be padded"
    with torch.no_grad():
        assert torch.equal(qwen.forward(**clips).logits, plain_clips)
        assert torch.equal(qwen.forward(**clips, kept=[torch.arange(n) for n in COUNTS]).logits, plain_clips)


def test_kept_equals_masked_reference_and_keeps_3d_ids(qwen, clips, plain_clips):
    """Qwen3-VL: the reference adds every DeepStack feature to its own column; the kept path must cut
    the video's DeepStack features with the same indices to match."""
    with torch.no_grad():
        hard = qwen.forward(**clips, kept=KEPT).logits[:, -1]
        soft = qwen.model(**masked_reference(qwen, clips, KEPT)).logits[:, -1]
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)
    assert (hard - plain_clips[:, -1]).abs().max() > 1e-3, "dropping tokens must change the answer"
    prepared = qwen.prepare(**clips, kept=KEPT)
    stays = masked_reference(qwen, clips, KEPT)["attention_mask"].bool()
    full = full_positions(qwen, clips)
    for b in range(len(ROWS)):
        real = prepared.attention_mask[b].bool()
        assert torch.equal(prepared.position_ids[1:, b][:, real], full[:, b][:, stays[b]])
    if qwen.family == "qwen2_5_vl":  # seconds per temporal patch space a video's temporal ids
        assert clips["second_per_grid_ts"].tolist() == [1.0, 1.0]
        video = qwen.layout(clips["input_ids"], clips["attention_mask"]).runs[0][0]
        t = full[0, 0, video.start: video.start + video.count]
        assert (t[6:] - t[:6]).unique().tolist() == [2]  # tokens_per_second 2 x 1 s


@pytest.mark.parametrize("with_kept", [False, True])
def test_padded_batch_equals_each_row_alone(qwen, clips, with_kept):
    per_row = [KEPT[:1], KEPT[1:3], KEPT[3:]]
    with torch.no_grad():
        together = qwen.forward(**clips, kept=KEPT if with_kept else None).logits[:, -1]
        for b, row in enumerate(ROWS):
            single = qwen.forward(**inputs(qwen, [row], first=b), kept=per_row[b] if with_kept else None)
            torch.testing.assert_close(together[b: b + 1], single.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_generate_with_kept_equals_masked_reference_and_no_cache(qwen, clips):
    eos = qwen.config.text_config.eos_token_id
    with torch.no_grad():
        new = qwen.generate(**clips, kept=KEPT, max_new_tokens=4, do_sample=False)
        reference = qwen.model.generate(**masked_reference(qwen, clips, KEPT), max_new_tokens=4, do_sample=False)
        assert until_eos(new, eos) == until_eos(reference[:, clips["input_ids"].shape[1]:], eos)
        plain = qwen.model.generate(**clips, max_new_tokens=4, do_sample=False)
        assert torch.equal(qwen.generate(**clips, max_new_tokens=4, do_sample=False),
                           plain[:, clips["input_ids"].shape[1]:])


def steps_without_cache(qwen, batch, n: int, blocked: list[int]) -> torch.Tensor:
    """``n`` greedy tokens, the whole prompt run again each step without a cache (``blocked`` never chosen)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(n):
        logits = qwen.forward(**dict(batch, input_ids=ids, attention_mask=mask, mm_token_type_ids=None),
                              use_cache=False).logits[:, -1]
        token = logits.index_fill(1, torch.tensor(blocked), -torch.inf).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("site", ["llm.0", "llm.1"])
def test_generate_with_a_stage_and_cache_equals_steps_without(qwen, clips, site):
    blocked = suppressed(qwen)
    handle = attach(qwen, "divprune", 0.5, site=site)
    try:
        with torch.no_grad():
            new = qwen.generate(**clips, max_new_tokens=4, do_sample=False, suppress_tokens=blocked)
            assert torch.equal(new, steps_without_cache(qwen, clips, 4, blocked))
    finally:
        handle.detach()


@pytest.mark.parametrize("method", ["divprune", "random"])
def test_llm0_budgets_per_unit_keep_all_and_the_kept_path(qwen, clips, plain_clips, method):
    with torch.no_grad():
        handle = attach(qwen, method, 1.0, site="llm.0")
        assert torch.equal(qwen.forward(**clips).logits, plain_clips), "keep-all is the plain model bit for bit"
        handle.detach()
        handle = attach(qwen, method, 0.5, site="llm.0")
        pruned, kept = qwen.forward(**clips).logits, kept_of(handle)
        assert [len(k) for k in kept] == [6, 3, 6, 8]  # half of each unit: video, image, video, image
        assert handle.last_kept[f"{method}@llm.0:0.5"].shape == (4, 8)
        handle.detach()
        assert torch.equal(pruned, qwen.forward(**clips, kept=kept).logits)
        handle = attach(qwen, method, 5, site="llm.0")
        qwen.forward(**clips)
        assert [len(k) for k in kept_of(handle)] == [5, 5, 5, 5]
        handle.detach()


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_llmk_budgets_per_row_and_each_row_alone(qwen, clips, plain_clips, method):
    config = {"name": "dart", "exact_budget": True} if method == "dart" else method
    with torch.no_grad():
        handle = attach(qwen, config, 1.0, site="llm.1")
        assert torch.equal(qwen.forward(**clips).logits, plain_clips)
        handle.detach()
        handle = attach(qwen, config, 0.5, site="llm.1")
        try:
            together, kept = qwen.forward(**clips).logits[:, -1], kept_of(handle)
            assert [len(k) for k in kept] == [6, 9, 8]  # half of each row's 12, 6 + 12 and 16 visual tokens
            for b, row in enumerate(ROWS):
                single = qwen.forward(**inputs(qwen, [row], first=b)).logits[:, -1]
                torch.testing.assert_close(together[b: b + 1], single, rtol=1e-5, atol=1e-5)
                assert torch.equal(kept[b], kept_of(handle)[0])
        finally:
            handle.detach()


def test_methods_see_each_units_grid(qwen, clips):
    """At llm.0 each unit alone, all its cells; at llm.k a row's units, with the cells llm.0 kept."""
    seen0, seen1 = [], []
    handle = attach(qwen, [(Spy(seen=seen0), "llm.0", 0.5), (Spy(seen=seen1), "llm.1", 0.5)])
    with torch.no_grad():
        qwen.forward(**clips)
    handle.detach()
    grids = [("video", 2, 2, 3), ("image", 1, 2, 3), ("video", 2, 2, 3), ("image", 1, 4, 4)]
    assert [[(u.kind, u.frames, u.rows, u.cols, u.start) for u in units[0]] for units in seen0] == \
        [[(*g, 0)] for g in grids]
    assert all(torch.equal(units[0][0].cells, torch.arange(n)) for units, n in zip(seen0, COUNTS))
    first = [torch.arange(n // 2) for n in COUNTS]  # the spy keeps the first half of each unit
    row1 = seen1[1][0]
    assert [(u.kind, u.start) for u in row1] == [("image", 0), ("video", 3)]
    assert torch.equal(row1[0].cells, first[1]) and torch.equal(row1[1].cells, first[2])
    assert [[u.kind for u in units[0]] for units in seen1] == [["video"], ["image", "video"], ["image"]]


def test_projector_input_of_images_and_videos_is_the_merger_input(qwen, clips):
    """Per unit, from its own tower pass (images, then videos; Qwen2.5's window order undone)."""
    seen = []
    handle = attach(qwen, MergerInputSpy(seen=seen), 0.5, site="llm.0")
    with torch.no_grad():
        qwen.forward(**clips)
        handle.detach()
        d_vision = seen[0][1].shape[-1] // qwen.merge_unit
        assert [tokens.shape[1] for tokens, _ in seen] == COUNTS
        for tokens, merger_input in seen:
            torch.testing.assert_close(qwen.visual.merger(merger_input[0].reshape(-1, d_vision)), tokens[0])


def test_cdpruner_on_videos_reads_each_units_question(qwen, clips, tmp_path):
    d_vision = qwen.visual.blocks[0].norm1.weight.shape[0]
    clip = save_tiny_clip(tmp_path, qwen.merge_unit * d_vision)  # a CLIP as wide as the merger's input per token
    handle = attach(qwen, {"name": "cdpruner", "text_encoder": str(clip)}, 0.5, site="llm.0")
    with torch.no_grad():
        pruned, kept = qwen.forward(**clips).logits, kept_of(handle)
        handle.detach()
        assert [len(k) for k in kept] == [6, 3, 6, 8]
        assert torch.equal(pruned, qwen.forward(**clips, kept=kept).logits)


@pytest.mark.parametrize("site", ["llm.0", "llm.1"])
def test_a_video_for_a_method_without_handles_video_is_one_line(qwen, clips, mixed, site):
    handle = attach(qwen, GridOnly(), 0.5, site=site)
    try:
        with torch.no_grad():
            qwen.forward(**mixed)  # images only: fine
            with pytest.raises(TokensieveError, match="holds a video, which grid_only cannot take") as caught:
                qwen.forward(**clips)
        assert "\n" not in str(caught.value) and "divprune" in str(caught.value)
    finally:
        handle.detach()


@pytest.mark.parametrize(("kept", "words"), [
    (KEPT[:3], "kept has 3 entries for the 4 images and videos of the batch"),
    ([torch.tensor([12]), *KEPT[1:]], "kept video 0: index 12 is outside the 12 visual"),
])
def test_bad_kept_and_mismatched_videos_are_one_line(qwen, clips, kept, words):
    with pytest.raises(TokensieveError, match=words) as caught:
        qwen.forward(**clips, kept=kept)
    assert "\n" not in str(caught.value)
    with pytest.raises(TokensieveError, match=r"videos for 1 videos \(video_grid_thw rows\)"):  # Qwen3: 3 (2 runs, then 1)
        qwen.forward(**dict(clips, video_grid_thw=clips["video_grid_thw"][:1]))
