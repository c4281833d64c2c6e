"""Pruning stages on the LLaVA-NeXT adapter, on the tiny random NeXT with a wide, a square and a tall
image in one batch: ``llm.0`` (each image's packed run, chosen per image) with random and DivPrune,
``llm.k`` (per row, inside the LLM) with FastV and DART. Newlines are never candidates and always enter
the LLM (policy ``keep``). A padded batch
against each row alone, and generate with the cache, for every method: test_family_contract.py."""

from __future__ import annotations

import pytest
import torch
from select_spy import rows_per_call
from tiny_llava_next import ROWS, VOCAB

from tokensieve.attach import attach
from tokensieve.backbones import call_runs

SIZES = [size for _, size in ROWS]
# DART with exact_budget keeps the budget exactly (its paper's rule keeps a multiple of its pivots).
STAGES = {"random": ("random", "llm.0"), "divprune": ("divprune", "llm.0"), "fastv": ("fastv", "llm.1"),
          "dart": ({"name": "dart", "exact_budget": True}, "llm.1")}
SUPPRESSED = [VOCAB["<image>"], VOCAB["</s>"]]  # placeholders read as images; the end would stop at once


def kept_of(handle) -> list[torch.Tensor]:
    """Per image (llm.0) or row (llm.k) the positions in its packed run that its first stage kept."""
    return [row[row >= 0] for row in handle.last_kept[str(handle.stages[0])]]


def layouts_of(llava_next, batch) -> list:
    return [llava_next.image_layout(size) for size in batch["image_sizes"].tolist()]


@pytest.mark.parametrize("method", STAGES)
def test_keep_all_budgets_per_image_and_detach(llava_next, next_batch, next_plain, method):
    spec, site = STAGES[method]
    with torch.no_grad():
        handle = attach(llava_next, spec, 1.0, site=site)
        assert torch.equal(llava_next.forward(**next_batch).logits, next_plain), "keep-all is the plain model"
        handle.detach()
        handle = attach(llava_next, spec, 0.5, site=site)
        pruned = llava_next.forward(**next_batch).logits
        kept = kept_of(handle)
        assert [len(k) for k in kept] == [24, 40, 24]  # half of each image's 48, 80, 48 base and crop tokens
        assert handle.last_counts == {f"{handle.stages[0]}": (59, 29)}  # means over the three images
        for k, layout in zip(kept, layouts_of(llava_next, next_batch)):
            assert not layout.is_newline[k].any(), "newlines are never candidates"
        dropped = torch.tensor([24, 40, 24])
        # llm.0: rows are assembled anew, the longest sets the length; llm.k: the row dropping fewest does
        length = int((next_batch["attention_mask"].sum(1) - dropped).max()) if site == "llm.0" else \
            next_plain.shape[1] - int(dropped.min())
        assert pruned.shape[1] == length
        with handle.disabled():
            assert torch.equal(llava_next.forward(**next_batch).logits, next_plain)
        handle.detach()
        assert torch.equal(llava_next.forward(**next_batch).logits, next_plain), "detach restores the model"
        handle = attach(llava_next, spec, 10, site=site)
        llava_next.forward(**next_batch)
        assert [len(k) for k in kept_of(handle)] == [10, 10, 10]
        handle.detach()


@pytest.mark.parametrize("method", ["random", "divprune"])
def test_llm0_is_the_kept_path_with_every_newline(llava_next, next_batch, method):
    handle = attach(llava_next, method, 0.5, site="llm.0")
    with torch.no_grad():
        prepared = llava_next.prepare(**next_batch)
        pruned = llava_next.forward(**next_batch).logits
        kept = kept_of(handle)
        handle.detach()
        runs = [torch.cat([k, layout.is_newline.nonzero().flatten()]).sort().values
                for k, layout in zip(kept, layouts_of(llava_next, next_batch))]
        assert (prepared.input_ids == llava_next.image_token_id).sum(1).tolist() == [24 + 4, 40 + 8, 24 + 8]
        assert torch.equal(pruned, llava_next.forward(**next_batch, kept=runs).logits)


@pytest.mark.parametrize("method", ["random", "divprune"])
def test_llm0_chooses_consecutive_images_of_one_count_in_one_call(llava_next, next_batch, method, monkeypatch):
    """With each image twice in a row, each pair is one call of two rows (as on an accelerator; on a CPU each
    image goes alone), and every image keeps what it keeps in the batch of one each (the wide and the tall
    image give 48 candidates each, but not in a row)."""
    calls = rows_per_call(monkeypatch, method)
    monkeypatch.setattr(call_runs, "BATCH_ON_CPU", True)
    handle = attach(llava_next, method, 0.5, site="llm.0")
    try:
        with torch.no_grad():
            llava_next.forward(**next_batch)
            kept = kept_of(handle)
            assert calls == [1, 1, 1]
            twice = torch.tensor([0, 0, 1, 1, 2, 2])
            llava_next.forward(**{key: value[twice] for key, value in next_batch.items()})
            assert calls[3:] == [2, 2, 2]
            assert [k.tolist() for k in kept_of(handle)] == [k.tolist() for k in kept for _ in range(2)]
    finally:
        handle.detach()


def greedy_without_cache(llava_next, batch, steps: int, suppressed=SUPPRESSED) -> torch.Tensor:
    """``steps`` greedy tokens (never a ``suppressed`` one), the whole sequence run again without a cache at
    every step."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        step = dict(batch, input_ids=ids, attention_mask=mask)
        logits = llava_next.forward(**step, use_cache=False).logits[:, -1]
        token = logits.index_fill(1, torch.tensor(suppressed), -torch.inf).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids[:, batch["input_ids"].shape[1]:]
