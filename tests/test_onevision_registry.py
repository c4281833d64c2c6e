"""Every registered method at every stage it acts at, on the tiny LLaVA-OneVision, with images (three aspect
ratios, two canvases interpolated) and with a video beside an image: it runs (each image, video or row keeps at
most its budget, never a newline) or is refused in one line, at attach or in the pass. A new method joins by
being registered; :data:`RUNS` says which run today."""

from __future__ import annotations

import pytest
import torch
from test_llava_next_registry import BUDGET, CASES, make  # noqa: F401  (make: a fixture)
from tiny_onevision import inputs

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.methods import method_class

# What runs: as on LLaVA-NeXT, less HiRED (SigLIP has no CLS token, so no per-crop CLS rows): scoring methods
# after packing (llm.0: those reading the projector's input or nothing) and inside the LLM (llm.1).
RUNS = {("cdpruner", "llm.0"), ("dart", "llm.1"), ("divprune", "llm.0"), ("divprune", "llm.1"), ("fastv", "llm.1"),
        ("layer_pruner", "llm.0"), ("layer_pruner", "llm.1"), ("random", "llm.0"), ("random", "llm.1"),
        ("pyramiddrop", "llm.1"), ("sparsevlm", "llm.1")}
# Attach, then refused in one line at the first pass: the merger's new values have no place here; DyCoke
# takes videos of 6 frames or more (these rows: images, and a video of 4; test_onevision_dycoke.py runs it).
REFUSED_IN_PASS = {("token_merger", "llm.0"), ("token_merger", "llm.1"), ("dycoke", "llm.0")}
VIDEO_ROWS = [("what happens ?", "video"), ("what colour ?", "wide")]


@pytest.fixture(scope="module")
def video_batch(onevision):
    return inputs(onevision.processor, VIDEO_ROWS)


@pytest.mark.parametrize("with_video", [False, True], ids=["images", "video"])
@pytest.mark.parametrize(("name", "site"), CASES)
def test_runs_or_is_refused_in_one_line(onevision, ov_batch, video_batch, make, name, site, with_video):  # noqa: F811
    method = make(name)
    budget = 0.5 if method.budget_is_share or name in ("pyramiddrop", "sparsevlm") else BUDGET
    batch = video_batch if with_video else ov_batch
    try:
        handle = attach(onevision, method, budget, site=site)
    except TokensieveError as err:
        assert (name, site) not in RUNS, f"{name} at {site} should run: {err}"
        assert "\n" not in str(err)
        assert not onevision.sessions
        return
    assert (name, site) in RUNS | REFUSED_IN_PASS, f"{name} at {site} runs: add it to RUNS"
    try:
        with torch.no_grad():
            if (name, site) in REFUSED_IN_PASS or (with_video and not method_class(name).handles_video):
                with pytest.raises(TokensieveError, match=r"^[^\n]*$"):
                    onevision.forward(**batch)
                return
            prepared = onevision.prepare(**batch)
            onevision.forward(**batch)
        kept = handle.last_kept[str(handle.stages[0])]
        if budget != BUDGET:  # a share (PyramidDrop) or SparseVLM's rank: fewer than the row had
            before, after = handle.last_counts[str(handle.stages[0])]
            assert after < before
        for b, row in enumerate(kept):
            row = row[row >= 0]
            assert 1 <= len(row) and (len(row) <= BUDGET or budget != BUDGET)
        if site == "llm.0":  # every newline entered the LLM: the video's one, the images' after each canvas row
            runs = (prepared.input_ids == onevision.image_token_id).sum(1)
            assert runs.tolist() == [len(row[row >= 0]) + n for row, n in
                                     zip(kept, [1, 4] if with_video else [4, 5, 3])]
    finally:
        handle.detach()


def test_pyramiddrop_with_original_positions_runs_on_the_video(onevision, video_batch, make):  # noqa: F811
    handle = attach(onevision, make("pyramiddrop", positions="original"), 0.5)
    try:
        with torch.no_grad():
            onevision.forward(**video_batch)
        # means over the rows: the video's 16 frame tokens and the image's 48 (newlines never candidates)
        assert handle.last_counts == {"pyramiddrop@llm.1:0.5": (32, 16), "pyramiddrop@llm.2:0.5": (16, 8)}
    finally:
        handle.detach()
