"""`tokensieve bench speed`'s native bound of each row and its decoding figures, on tiny shapes.

No timing is asserted here: the targets are read off the benchmark command's output. What is
checked is that the native bound runs the same computation as the pruned hooked model (the same
logits, for methods whose kept tokens it can reproduce), and that the figures are there.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tokensieve.attach import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.cli import main
from tokensieve.evaluate import speed
from tokensieve.evaluate.decode_speed import cache_bytes, decode_figures
from tokensieve.evaluate.flops import token_counts
from tokensieve.evaluate.latency import kv_cache_bytes
from tokensieve.evaluate.native_bounds import (
    hook_free_twin,
    native_plan,
    native_prefill,
    plan_from_counts,
)
from tokensieve.evaluate.timing import alternating_timings

# 16 visual + 8 text tokens; two tower blocks (so vision.1 is a site), four LLM layers.
TINY = speed.BenchShape(llm_layers=4, llm_hidden=32, llm_heads=2, llm_intermediate=64, vision_layers=2,
                        vision_hidden=16, vision_heads=2, image_size=56, patch_size=14, text_tokens=8, vocab=100)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    backbone = LlavaBackbone(speed.build_bench_model(TINY))
    return backbone, LlavaBackbone(hook_free_twin(backbone.model)), speed.bench_inputs(TINY, batch=2)


def test_the_twin_shares_every_weight_and_has_no_hook(models):
    backbone, native, _ = models
    for (name, a), (_, b) in zip(backbone.model.state_dict().items(), native.model.state_dict().items(), strict=True):
        assert a.data_ptr() == b.data_ptr(), name
    handle = attach(backbone, "fastv", 0.5)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in native.model.modules())
    handle.detach()


@pytest.mark.parametrize(("method", "site", "budget"), [
    ("random", "vision.1", 0.5), ("random", "projector", 0.5), ("random", "llm.0", 0.25),
    ("fastv", "llm.2", 0.5), ("random", "llm.1", 0.25), ("pyramiddrop", None, 0.5)])
def test_the_native_bound_computes_the_pruned_models_logits(models, method, site, budget):
    backbone, native, inputs = models
    handle = attach(backbone, method, budget, site=site)
    try:
        with torch.no_grad():
            pruned = backbone.forward(**inputs, logits_to_keep=1).logits
        plan, short_kept, renumber = native_plan(handle, backbone, token_counts(backbone, TINY.text_tokens, handle),
                                                 TINY.text_tokens, 2)
        sites = sorted(str(s) for s in plan)
        assert sites == sorted(st.site for st in handle.stages)
        last = handle.last_kept[str(handle.stages[-1])]
        assert torch.equal(short_kept, last)  # the visual tokens that reach the last layer
    finally:
        handle.detach()
    bound = native_prefill(native, **inputs, plan=plan, renumber=renumber)
    torch.testing.assert_close(bound, pruned, rtol=0, atol=0)
    with torch.no_grad():
        unpruned = backbone.forward(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(native_prefill(native, **inputs, plan={}), unpruned, rtol=0, atol=0)


def test_a_method_that_merges_is_bounded_by_the_counts_its_blocks_saw(models):
    backbone, _, _ = models
    handle = attach(backbone, "tome", 0.5)  # merges inside both tower blocks: 16 -> 12 -> 8 patches
    try:
        with torch.no_grad():
            backbone.forward(**models[2], logits_to_keep=1)
        counts = token_counts(backbone, TINY.text_tokens, handle)
        plan, short_kept, _ = native_plan(handle, backbone, counts, TINY.text_tokens, 2)
    finally:
        handle.detach()
    assert {str(s): tuple(k.shape) for s, k in plan.items()} == {"vision.1": (2, 12), "projector": (2, 8)}
    assert short_kept.shape == (2, 8)
    unpruned, all_visual = plan_from_counts(token_counts(backbone, TINY.text_tokens), backbone, TINY.text_tokens, 2)
    assert unpruned == {} and torch.equal(all_visual[0], torch.arange(TINY.n_visual))


def test_alternating_timings_runs_the_variants_in_turn():
    calls = []
    times = alternating_timings({n: (lambda n=n: calls.append(n)) for n in "abc"}, repeats=2, warmup=1)
    assert calls == list("abc") * 3
    assert {n: len(t) for n, t in times.items()} == {"a": 2, "b": 2, "c": 2}


def test_decoding_figures_count_the_cache_the_prefill_left(models):
    backbone, native, inputs = models
    handle = attach(backbone, "fastv", 0.5)
    try:
        with torch.no_grad():
            backbone.forward(**inputs, logits_to_keep=1)
        short_kept = handle.last_kept[str(handle.stages[0])]
        row = decode_figures(backbone, native, inputs, short_kept, new_tokens=3, repeats=1)
    finally:
        handle.detach()
    config, n, text = backbone.config, TINY.n_visual, TINY.text_tokens
    per_row = {"full": [n + text] * 4, "pruned": [n + text] * 2 + [n // 2 + text] * 2, "short": [n // 2 + text] * 4}
    for variant, layers in per_row.items():  # float32: 4 bytes; two prompts
        assert row[f"kv_cache_bytes_{variant}"] == 2 * kv_cache_bytes(config, layers, dtype_bytes=4)
        assert row[f"decode_ms_per_token_{variant}"] > 0 and row[f"generate_s_{variant}"] > 0
        assert row[f"peak_memory_mb_{variant}"] is None  # measured on CUDA only
    assert row["kv_ratio_to_short"] == pytest.approx(row["kv_cache_bytes_pruned"] / row["kv_cache_bytes_short"],
                                                     abs=1e-3)
    assert row["decode_ratio_to_short"] == pytest.approx(
        row["decode_ms_per_token_pruned"] / row["decode_ms_per_token_short"], rel=1e-2)


def test_cache_bytes_sums_keys_and_values_of_every_layer(models):
    backbone, _, inputs = models
    with torch.no_grad():
        cache = backbone.forward(**inputs, use_cache=True, logits_to_keep=1).past_key_values
    assert cache_bytes(cache) == 2 * kv_cache_bytes(backbone.config, [TINY.n_visual + TINY.text_tokens] * 4, 4)


def test_bench_speed_reports_the_bound_and_decoding_of_each_row(monkeypatch, capsys):
    monkeypatch.setattr(speed, "BenchShape", lambda: replace(TINY, llm_layers=3, vision_layers=1))
    assert main(["bench", "speed", "--method", "fastv,random", "--budget", "0.5", "--repeats", "1",
                 "--new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["new_tokens"] == 2
    for r in out["rows"]:
        assert r["native_bound_ms"] > 0
        assert r["ratio_to_bound"] == pytest.approx(r["native_bound_ms"] / r["prefill_ms_pruned"], rel=1e-2)
        for variant in ("full", "pruned", "short"):
            assert {f"decode_ms_per_token_{variant}", f"generate_s_{variant}", f"kv_cache_bytes_{variant}",
                    f"peak_memory_mb_{variant}"} <= set(r)
        assert {"decode_ratio_to_short", "kv_ratio_to_short"} <= set(r)
    assert main(["bench", "speed", "--method", "fastv", "--budget", "0.5", "--repeats", "1", "--new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "built natively with no pruning code" in text and "fastv      llm.2" in text


def test_one_new_token_is_refused(capsys):
    assert main(["bench", "speed", "--new-tokens", "1"]) != 0
    assert "--new-tokens must be at least 2" in capsys.readouterr().err
