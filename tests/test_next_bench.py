"""`tokensieve bench speed --shape llava-next-*`: the LLaVA-NeXT native bound of each row, the shape, its
FLOPs ideal and the command, on a tiny NeXT shape (a 56 x 56 px image: a base and 2 x 2 crops of 16
tokens, 8 newlines).

No timing is asserted: what is checked is that the native bound (the tower and packing unpruned, an
LLM prompt of only the tokens that entered it at ``llm.0``; the layers before ``llm.k`` on all tokens,
the rest on the kept columns and the newlines) computes the pruned model's logits exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokensieve.attach import attach
from tokensieve.backbones.hf_llava_next import LlavaNextBackbone
from tokensieve.cli import main
from tokensieve.evaluate import next_bench
from tokensieve.evaluate.native_bounds import hook_free_twin
from tokensieve.evaluate.next_bounds import NextPlan, native_next_prefill, next_native_plan
from tokensieve.methods.random_keep import RandomKeep

TINY = next_bench.NextBenchShape(llm_layers=3, llm_hidden=32, llm_heads=2, llm_intermediate=64, vision_layers=2,
                                 vision_hidden=16, vision_heads=2, crop_size=28, patch_size=7, image_height=56,
                                 image_width=56, text_tokens=8, vocab=100)


@dataclass
class RandomWithoutNewlines(RandomKeep):
    """Random at llm.0, its image's newlines dropped (as HiRED's reference drops them), with no scoring FLOPs."""

    newlines: str = "drop"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    backbone = TINY.build()
    return backbone, LlavaNextBackbone(hook_free_twin(backbone.model)), TINY.inputs(2)


def test_the_tiny_shape_packs_a_base_and_four_crops_with_newlines():
    assert (TINY.n_visual, TINY.always_kept, TINY.layout.n_crops) == (16 + 8 * (8 + 1), 8, 5)


@pytest.mark.parametrize(("method", "site", "split"), [
    ("random", "llm.0", "all"), ("divprune", "llm.0", "all"), ("random", "llm.0", "even"), ("fastv", "llm.2", "all"),
    ("random", "llm.1", "all"), ([("random", "llm.0", 0.5), ("fastv", "llm.2", 0.5)], None, "all"),
    (RandomWithoutNewlines(), "llm.0", "all"), ({"name": "pyramiddrop", "layers": (1, 2)}, None, "all")],
    ids=["random-llm.0", "divprune-llm.0", "random-llm.0-even", "fastv-llm.2", "random-llm.1", "llm.0+llm.2",
         "llm.0-newlines-dropped", "pyramiddrop-renumbered"])
def test_the_native_bound_computes_the_pruned_models_logits(tiny, method, site, split):
    backbone, native, inputs = tiny
    handle = attach(backbone, method, None if isinstance(method, list) else 0.5, site=site, split=split)
    try:
        with torch.no_grad():
            pruned = backbone.forward(**inputs, logits_to_keep=1).logits
        plan, short_kept = next_native_plan(handle, backbone, inputs["image_sizes"])
        last = handle.last_kept[str(handle.stages[-1])]
    finally:
        handle.detach()
    torch.testing.assert_close(native_next_prefill(native, **inputs, plan=plan), pruned, rtol=0, atol=0)
    inside = sorted(st.site for st in handle.stages if st.site != "llm.0")
    assert sorted(f"llm.{k}" for k in plan.llm) == inside
    assert (plan.entering is not None) == (handle.stages[0].site == "llm.0")
    newline, newlines = TINY.layout.is_newline, 0 if isinstance(method, RandomWithoutNewlines) else TINY.always_kept
    for kept, row in zip(short_kept, last):  # what reaches the last layer: its stage's kept tokens and the newlines
        assert torch.equal(kept[~newline[kept]], row[row >= 0]) and int(newline[kept].sum()) == newlines
    if not inside:  # a natively short prompt of the same tokens is the same prefill
        with torch.no_grad():
            short = native.forward(**inputs, kept=short_kept, logits_to_keep=1).logits
        torch.testing.assert_close(short, pruned, rtol=0, atol=0)


def test_the_native_bound_stands_in_for_tokens_a_method_made(tiny):
    """SparseVLM's recycled tokens and the rows' different counts (its rank differs per question): the bound
    keeps as many of the tokens it dropped, so every layer after a stage runs on as many columns as the pruned
    pass, whose rows keeping fewer keep masked slots (its logits differ: the stand-ins are other tokens)."""
    backbone, _, inputs = tiny
    handle = attach(backbone, {"name": "sparsevlm", "layers": (1, 2), "scale": 0.8, "bias": 0.0}, 64)
    try:
        with torch.no_grad():
            backbone.forward(**inputs, logits_to_keep=1)
        plan, short_kept = next_native_plan(handle, backbone, inputs["image_sizes"])
    finally:
        handle.detach()
    assert plan.renumber
    kept = list(handle.last_kept.values())
    assert int((kept[0] == -3).sum()) > 0, "the first stage recycled tokens"
    widths = [int(((row >= 0) | (row == -3)).sum(1).max()) for row in kept]  # kept and made, the widest row
    assert sorted(plan.llm) == [1, 2]
    assert [plan.llm[k].shape[1] for k in (1, 2)] == [w + TINY.always_kept for w in widths]  # and the newlines
    assert [len(row) for row in short_kept] == [widths[-1] + TINY.always_kept] * 2


def test_the_unpruned_plan_is_the_unpruned_model(tiny):
    backbone, native, inputs = tiny
    with torch.no_grad():
        plain = backbone.forward(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(native_next_prefill(native, **inputs, plan=NextPlan(TINY.n_visual)), plain,
                               rtol=0, atol=0)


@pytest.mark.parametrize("stage", [None, ("random", 0.5, "llm.0"), ("random", 0.5, "llm.2"),
                                   (RandomWithoutNewlines(), 0.5, "llm.0")],
                         ids=["unpruned", "llm.0", "llm.2", "llm.0-newlines-dropped"])
def test_the_linear_flops_match_torchs_counter(tiny, stage):  # methods with no scoring FLOPs
    backbone, _, _ = tiny
    inputs = TINY.inputs(1)
    handle = None if stage is None else attach(backbone, stage[0], stage[1], site=stage[2])
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:  # the CPU's SDPA (scores) is not counted
            backbone.forward(**inputs, logits_to_keep=1)
        linear = TINY.linear_flops(backbone.config, handle)
    finally:
        if handle is not None:
            handle.detach()
    assert linear == counter.get_total_flops()


def test_the_7b_shape_is_llava_next_7b_and_the_cpu_one_keeps_its_tokens():
    big, cpu = next_bench.NextBenchShape.llava_next_7b(), next_bench.NextBenchShape()
    config = big.config()  # llava-v1.6-vicuna-7b's architecture
    tc, vc = config.text_config, config.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.intermediate_size, tc.vocab_size) == \
        (4096, 32, 32, 11008, 32064)
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.image_size, vc.patch_size) == \
        (1024, 24, 16, 336, 14)
    assert config.vision_feature_layer == -2 and config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672],
                                                                                [1008, 336], [336, 1008]]
    assert (big.n_visual - big.always_kept, big.always_kept, big.layout.n_crops) == (2880, 48, 5)
    assert (cpu.n_visual, cpu.always_kept, cpu.text_tokens) == (big.n_visual, big.always_kept, big.text_tokens)


def test_bench_speed_on_a_next_shape_reports_every_figure(monkeypatch, capsys):
    monkeypatch.setattr(next_bench, "NextBenchShape", lambda: TINY)
    common = ["--shape", "llava-next-cpu", "--budget", "0.5", "--repeats", "1", "--new-tokens", "2", "--json"]
    assert main(["bench", "speed", "--method", "fastv,dart", "--param", "dart.exact_budget=true", *common]) == 0
    inside = json.loads(capsys.readouterr().out)
    llm0 = ["--method", "random,divprune,hired", "--site", "llm.0", "--batch", "2"]
    assert main(["bench", "speed", *llm0, *common]) == 0
    before = json.loads(capsys.readouterr().out)
    assert inside["shape"]["n_visual"] == 88 and inside["shape"]["image_width"] == 56
    rows = inside["rows"] + before["rows"]
    assert [(r["method"], r["site"]) for r in rows] == [("fastv", "llm.2"), ("dart(exact_budget=True)", "llm.2"),
                                                        ("random", "llm.0"), ("divprune", "llm.0"), ("hired", "llm.0")]
    for r in rows:  # half the 80 base and crop tokens (HiRED: at most, its shares rounded down); the 8 newlines stay
        assert r["visual_tokens_kept"] == 40 or r["method"] == "hired" and 36 <= r["visual_tokens_kept"] <= 40
        assert r["native_bound_ms"] > 0 and r["ideal_speedup"] > 1
        assert r["ratio_to_bound"] == pytest.approx(r["native_bound_ms"] / r["prefill_ms_pruned"], rel=1e-2)
        for variant in ("full", "pruned", "short"):
            assert r[f"decode_ms_per_token_{variant}"] > 0 and r[f"generate_s_{variant}"] > 0
            assert r[f"kv_cache_bytes_{variant}"] > 0 and r[f"peak_memory_mb_{variant}"] is None
        assert r["kv_cache_bytes_short"] < r["kv_cache_bytes_full"]
    for r in before["rows"]:  # before the LLM the pruned cache is the natively short one
        assert r["kv_ratio_to_short"] == 1.0
    native = inside["native_llm"][0]  # the shorter prompt: 40 kept, 8 newlines, 8 text tokens of 96
    assert native["visual_tokens_kept"] == 40 and native["token_ratio"] == pytest.approx(96 / 56, abs=1e-3)


def test_the_7b_next_shape_is_refused_on_a_cpu(capsys):
    assert main(["bench", "speed", "--shape", "llava-next-7b", "--device", "cpu"]) == 2
    assert "use --shape llava-next-cpu here" in capsys.readouterr().err
