"""Pruning stages on the LLaVA-OneVision adapter, on the tiny random OneVision with a wide image (its canvas
kept), a square and a long one (their canvases interpolated) in one batch: ``llm.0`` (each image's packed
run, chosen per image) with random and DivPrune, ``llm.k`` (per row) with FastV and DART. Newlines are never
candidates and always enter the LLM. A padded batch
against each row alone, and generate with the cache, for every method: test_family_contract.py."""

from __future__ import annotations

import pytest
import torch
from test_llava_next_pruning import kept_of

from tokensieve.attach import attach

CANDIDATES = [48, 41, 43]  # 52 - 4, 46 - 5, 46 - 3 newlines
HALF = [24, 20, 22]  # half of each, rounded half to even
STAGES = {"random": ("random", "llm.0"), "divprune": ("divprune", "llm.0"), "fastv": ("fastv", "llm.1"),
          "dart": ({"name": "dart", "exact_budget": True}, "llm.1")}


def layouts_of(onevision, batch) -> list:
    return [onevision.image_layout(size) for size in batch["image_sizes"].tolist()]


@pytest.mark.parametrize("method", STAGES)
def test_keep_all_budgets_per_image_and_detach(onevision, ov_batch, ov_plain, method):
    spec, site = STAGES[method]
    with torch.no_grad():
        handle = attach(onevision, spec, 1.0, site=site)
        assert torch.equal(onevision.forward(**ov_batch).logits, ov_plain), "keep-all is the plain model"
        handle.detach()
        handle = attach(onevision, spec, 0.5, site=site)
        pruned = onevision.forward(**ov_batch).logits
        kept = kept_of(handle)
        assert [len(k) for k in kept] == HALF
        for k, layout in zip(kept, layouts_of(onevision, ov_batch)):
            assert not layout.is_newline[k].any(), "newlines are never candidates"
        dropped = torch.tensor([c - h for c, h in zip(CANDIDATES, HALF)])
        length = int((ov_batch["attention_mask"].sum(1) - dropped).max()) if site == "llm.0" else \
            ov_plain.shape[1] - int(dropped.min())
        assert pruned.shape[1] == length
        with handle.disabled():
            assert torch.equal(onevision.forward(**ov_batch).logits, ov_plain)
        handle.detach()
        assert torch.equal(onevision.forward(**ov_batch).logits, ov_plain), "detach restores the model bit for bit"
        handle = attach(onevision, spec, 10, site=site)
        onevision.forward(**ov_batch)
        assert [len(k) for k in kept_of(handle)] == [10, 10, 10]
        handle.detach()


def test_an_even_split_keeps_each_parts_share_and_a_video_or_hireds_rule_is_refused(onevision, ov_batch):
    from tiny_onevision import inputs as ov_inputs

    from tokensieve.errors import TokensieveError

    handle = attach(onevision, "random", 6, site="llm.0", split="even")
    try:
        with torch.no_grad():
            onevision.forward(**ov_batch)
            kept = kept_of(handle)
            layouts = [onevision.image_layout(size) for size in ov_batch["image_sizes"].tolist()]
            for k, layout in zip(kept, layouts):
                parts = layout.part[k].tolist()
                n = layout.n_crops
                assert len(k) == 6 and parts.count(0) == 6 // n + 6 % n  # the remainder goes to the base
            with pytest.raises(TokensieveError, match="row 0 holds a video, which has none") as caught:
                onevision.forward(**ov_inputs(onevision.processor, [("what happens ?", "video")]))
    finally:
        handle.detach()
    assert "\n" not in str(caught.value)
    with pytest.raises(TokensieveError, match="split 'hired': LLaVA-OneVision offers split all, even"):
        attach(onevision, "random", 6, site="llm.0", split="hired")
