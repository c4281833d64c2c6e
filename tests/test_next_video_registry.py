"""Every registered method at every stage it acts at, on the tiny LLaVA-NeXT-Video, with images (two aspect
ratios) and with a video beside an image: it runs (each image, video or row keeps at most its budget, never a
newline) or is refused in one line, at attach or in the pass. A new method joins by being registered;
:data:`RUNS` says which run today."""

from __future__ import annotations

import pytest
import torch
from test_llava_next_registry import BUDGET, CASES, make  # noqa: F401  (make: a fixture)
from tiny_next_video import inputs

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.methods import method_class

# What runs: as on LLaVA-NeXT (the same CLIP tower and image packing, so HiRED's per-crop CLS rows too).
RUNS = {("cdpruner", "llm.0"), ("dart", "llm.1"), ("divprune", "llm.0"), ("divprune", "llm.1"), ("fastv", "llm.1"),
        ("hired", "llm.0"), ("layer_pruner", "llm.0"), ("layer_pruner", "llm.1"), ("random", "llm.0"),
        ("random", "llm.1"),
        ("pyramiddrop", "llm.1"), ("sparsevlm", "llm.1")}
# Attach, then refused in one line at the first pass: the merger's new values have no place here; DyCoke
# takes videos of 6 frames or more (these rows: images, and a video of 4; test_next_video_dycoke.py runs it).
REFUSED_IN_PASS = {("token_merger", "llm.0"), ("token_merger", "llm.1"), ("dycoke", "llm.0")}
IMAGE_ROWS = [("what is the colour ?", "wide"), ("what colour ?", "tall")]
VIDEO_ROWS = [("what happens ?", "video"), ("what colour ?", "wide")]
NEWLINES = {False: [4, 8], True: [0, 4]}  # per row, by whether the batch holds the video


@pytest.fixture(scope="module")
def batches(next_video):
    return {False: inputs(next_video.processor, IMAGE_ROWS), True: inputs(next_video.processor, VIDEO_ROWS)}


@pytest.mark.parametrize("with_video", [False, True], ids=["images", "video"])
@pytest.mark.parametrize(("name", "site"), CASES)
def test_runs_or_is_refused_in_one_line(next_video, batches, make, name, site, with_video):  # noqa: F811
    method = make(name)
    budget = 0.5 if method.budget_is_share or name in ("pyramiddrop", "sparsevlm") else BUDGET
    batch = batches[with_video]
    try:
        handle = attach(next_video, method, budget, site=site)
    except TokensieveError as err:
        assert (name, site) not in RUNS, f"{name} at {site} should run: {err}"
        assert "\n" not in str(err)
        assert not next_video.sessions
        return
    assert (name, site) in RUNS | REFUSED_IN_PASS, f"{name} at {site} runs: add it to RUNS"
    try:
        with torch.no_grad():
            if (name, site) in REFUSED_IN_PASS or (with_video and not method_class(name).handles_video):
                with pytest.raises(TokensieveError, match=r"^[^\n]*$"):
                    next_video.forward(**batch)
                return
            prepared = next_video.prepare(**batch)
            next_video.forward(**batch)
        kept = handle.last_kept[str(handle.stages[0])]
        if budget != BUDGET:  # a share (PyramidDrop) or SparseVLM's rank: fewer than the row had
            before, after = handle.last_counts[str(handle.stages[0])]
            assert after < before
        for row in kept:
            row = row[row >= 0]
            assert 1 <= len(row) and (len(row) <= BUDGET or budget != BUDGET)
        if site == "llm.0" and name != "hired":  # every image newline entered the LLM (HiRED drops them)
            runs = (prepared.input_ids == next_video.image_token_id).sum(1)
            assert runs.tolist() == [len(row[row >= 0]) + n for row, n in zip(kept, NEWLINES[with_video])]
    finally:
        handle.detach()
