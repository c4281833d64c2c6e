"""Every registered method at every stage it acts at, on the tiny LLaVA-NeXT: it runs (each image or row
keeps at most its budget, never a newline) or is refused when attaching, in one line. A new method
joins by being registered; :data:`RUNS` says which run today."""

from __future__ import annotations

import pytest
import torch
from tiny_clip_text import save_tiny_clip

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.methods import create_method, list_methods, method_class

SITE_OF_STAGE = {"vision": "vision.1", "projector": "projector", "llm": ("llm.0", "llm.1")}
CASES = [(name, site) for name in list_methods() for stage in method_class(name).stages
         for site in ([SITE_OF_STAGE[stage]] if stage != "llm" else SITE_OF_STAGE[stage])]
# What runs: scoring methods after packing (llm.0: the methods reading the projector's input, nothing, or
# the tower's CLS rows per crop: HiRED) and inside the LLM (llm.1: PyramidDrop and SparseVLM as released too,
# positions renumbered and recycled tokens). Refused: every vision/projector site (none on NeXT), methods
# needing signals a site lacks, and the schedules' llm.0 (PyramidDrop and SparseVLM act at their layers).
RUNS = {("cdpruner", "llm.0"), ("dart", "llm.1"), ("divprune", "llm.0"), ("divprune", "llm.1"), ("fastv", "llm.1"),
        ("hired", "llm.0"), ("layer_pruner", "llm.0"), ("layer_pruner", "llm.1"), ("random", "llm.0"),
        ("random", "llm.1"), ("pyramiddrop", "llm.1"), ("sparsevlm", "llm.1")}
# Attach, then refused in one line at the first pass: the merger's llm stage is for Qwen-VL's llm.0; here
# the new values it gives the kept tokens have no place.
REFUSED_IN_PASS = {("token_merger", "llm.0"), ("token_merger", "llm.1")}
BUDGET = 16


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """Method name -> an instance for the tiny model (CDPruner's CLIP text encoder a tiny one as wide as
    the tiny tower; PyramidDrop and SparseVLM at layers the 3-layer LLM has)."""
    clip = save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), width=32)
    needs = {"cdpruner": {"text_encoder": str(clip)}, "pyramiddrop": {"layers": (1, 2)},
             "sparsevlm": {"layers": (1, 2), "scale": 9.0, "bias": 6.0}}
    return lambda name, **extra: create_method(name, **needs.get(name, {}), **extra)


@pytest.mark.parametrize(("name", "site"), CASES)
def test_runs_or_is_refused_in_one_line(llava_next, next_batch, make, name, site):
    method = make(name)
    budget = 0.5 if method.budget_is_share or name in ("pyramiddrop", "sparsevlm") else BUDGET
    try:
        handle = attach(llava_next, method, budget, site=site)
    except TokensieveError as err:
        assert (name, site) not in RUNS, f"{name} at {site} should run: {err}"
        assert "\n" not in str(err)
        assert not llava_next.sessions
        return
    assert (name, site) in RUNS | REFUSED_IN_PASS, f"{name} at {site} runs: add it to RUNS"
    layouts = [llava_next.image_layout(size) for size in next_batch["image_sizes"].tolist()]
    try:
        with torch.no_grad():
            if (name, site) in REFUSED_IN_PASS:
                with pytest.raises(TokensieveError, match=r"^[^\n]*$"):
                    llava_next.forward(**next_batch)
                return
            llava_next.forward(**next_batch)
        kept = handle.last_kept[str(handle.stages[0])]
        if budget != BUDGET:  # a share (PyramidDrop) or SparseVLM's rank: fewer than the row had
            before, after = handle.last_counts[str(handle.stages[0])]
            assert after < before
        for row, layout in zip(kept, layouts):
            row = row[row >= 0]
            assert 1 <= len(row) and (len(row) <= BUDGET or budget != BUDGET) and not layout.is_newline[row].any()
    finally:
        handle.detach()


def test_pyramiddrop_with_original_positions_runs_per_row(llava_next, next_batch, make):
    handle = attach(llava_next, make("pyramiddrop", positions="original"), 0.5)
    try:
        with torch.no_grad():
            llava_next.forward(**next_batch)
        assert handle.last_counts == {"pyramiddrop@llm.1:0.5": (59, 29), "pyramiddrop@llm.2:0.5": (29, 15)}
    finally:
        handle.detach()
