"""``bench capacity``: the largest batch under a memory limit (a search over measured peaks) and
the throughput there, with and without pruning."""

from __future__ import annotations

import pytest

from tokensieve.evaluate import capacity
from tokensieve.evaluate.speed import BenchShape

# Small enough to run in seconds, with enough visual tokens (576) that pruning them shows in memory.
SMALL = BenchShape(llm_layers=2, llm_hidden=64, llm_heads=4, llm_intermediate=172, vision_layers=1,
                   vision_hidden=32, vision_heads=2, vocab=1000)


@pytest.mark.parametrize("largest, max_batch", [(37, 256), (1, 256), (0, 256), (256, 256), (300, 100), (63, 64)])
def test_the_search_finds_the_largest_batch_that_fits(largest, max_batch):
    found, tried = capacity.largest_batch(lambda b: b <= largest, max_batch)
    assert found == min(largest, max_batch)
    assert all(fit == (b <= largest) for b, fit in tried.items())
    assert max(tried) <= max_batch
    assert len(tried) <= 2 * max_batch.bit_length()  # doubling, then bisecting: logarithmic


def test_a_pruned_generate_peaks_lower_than_the_unpruned_one_on_a_cpu():
    # Measured in fresh processes (resident memory); 576 -> 64 visual tokens frees the activations
    # of 512 of the 616 prompt positions at batch 16, tens of MiB here.
    full = capacity.peak_bytes(SMALL, None, None, 16, 2)
    pruned = capacity.peak_bytes(SMALL, "random", 0.11, 16, 2)
    weights = sum(p.numel() * 4 for p in SMALL.build().model.parameters())
    assert pruned > weights
    assert full - pruned > 20 * 2**20, (full, pruned)


def test_capacity_rows_compare_each_method_with_the_unpruned_model(monkeypatch):
    # Peaks from a stand-in that grows with the batch and shrinks with the budget, so the search
    # is exact; the throughput is measured on the real small model.
    def peak(shape, method, budget, batch, new_tokens, device, dtype, site):
        return batch * (100 if method is None else 100 * budget + 10) * 2**20
    monkeypatch.setattr(capacity, "peak_bytes", peak)
    rows = capacity.capacity_rows(SMALL, ("random",), (0.25,), 400 * 2**20, max_batch=8, new_tokens=2, repeats=1,
                                  progress=False)
    assert [r["method"] for r in rows] == ["none", "random"]
    assert rows[0]["largest_batch"] == 4 and rows[1]["largest_batch"] == 8  # 400 // 100, then capped at 8
    assert rows[0]["peak_memory_mb"] == 400 and rows[1]["peak_memory_mb"] == 280
    assert rows[1]["batch_ratio"] == 2.0
    assert rows[1]["throughput_ratio"] == round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    for r in rows:  # generate_s is rounded to 0.1 ms
        assert r["tokens_per_s"] == pytest.approx(r["largest_batch"] * 2 / r["generate_s"], rel=0.01)


def test_nothing_fits_under_a_limit_below_batch_one(monkeypatch):
    monkeypatch.setattr(capacity, "peak_bytes", lambda *a: 2**30)
    rows = capacity.capacity_rows(SMALL, ("random",), (0.25,), 2**20, progress=False)
    assert [(r["largest_batch"], r["peak_memory_mb"]) for r in rows] == [(0, None), (0, None)]
    assert "tokens_per_s" not in rows[1]
