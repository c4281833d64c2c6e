"""`tokensieve bench speed --shape qwen2.5-vl-*`: the Qwen-VL native bound of each row, the shape, its
FLOPs ideal and the command, on tiny Qwen-VL models.

No timing is asserted: what is checked is that the native bound (the tower unpruned, an LLM prompt
of only the kept tokens with their M-RoPE ids at ``llm.0``; the layers before ``llm.k`` on all
tokens, the rest on the kept columns) computes the pruned model's logits exactly, on every family.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_qwen import inputs, kept_of
from torch.utils.flop_counter import FlopCounterMode

from tokensieve.attach import attach
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.cli import main
from tokensieve.errors import TokensieveError
from tokensieve.evaluate import qwen_bench
from tokensieve.evaluate.native_bounds import hook_free_twin
from tokensieve.evaluate.qwen_bounds import (
    QwenPlan,
    native_qwen_prefill,
    qwen_native_plan,
)
from tokensieve.evaluate.qwen_flops import qwen_prefill_flops

# Two rows of two images each (6 + 16 visual tokens in either order), questions of different
# lengths (the shorter row is left-padded): every row keeps as many tokens at a ratio budget.
EQUAL_ROWS = [("what is the colour ?", ["small", "big"]), ("what shape is left and right ?", ["big", "small"])]
PYRAMIDDROP = {"name": "pyramiddrop", "positions": "original", "layers": [1, 2]}  # the tiny LLM has 3 layers

# 8 visual tokens (a 56 x 112 px image: 4 x 8 patches), 8 text tokens, window and full tower blocks.
TINY = qwen_bench.QwenBenchShape(llm_layers=3, llm_hidden=32, llm_heads=2, llm_kv_heads=1, llm_intermediate=64,
                                 mrope_section=(2, 3, 3), vision_layers=2, vision_hidden=16, vision_heads=2,
                                 vision_intermediate=32, fullatt_blocks=(1,), window_size=56, image_height=56,
                                 image_width=112, text_tokens=8, vocab=100)


@pytest.fixture(scope="module")
def native(qwen):
    return QwenVLBackbone(hook_free_twin(qwen.model))


@pytest.fixture(scope="module")
def rows(qwen):
    batch = inputs(qwen, EQUAL_ROWS)
    batch.pop("mm_token_type_ids")  # the adapter computes them from the ids, as the native prefill does
    return batch


@pytest.mark.parametrize(("method", "site", "budget"), [
    ("random", "llm.0", 0.5), ("divprune", "llm.0", 0.5), ("fastv", "llm.2", 0.5), ("random", "llm.1", 0.5),
    ("dart", "llm.2", 0.5), (PYRAMIDDROP, None, 0.5),
    ([("random", "llm.0", 0.5), ("fastv", "llm.2", 0.5)], None, None)],
    ids=["random-llm.0", "divprune-llm.0", "fastv-llm.2", "random-llm.1", "dart-llm.2", "pyramiddrop", "llm.0+llm.2"])
def test_the_native_bound_computes_the_pruned_models_logits(qwen, native, rows, method, site, budget):
    handle = attach(qwen, method, budget, site=site)
    try:
        with torch.no_grad():
            pruned = qwen.forward(**rows, logits_to_keep=1).logits
        plan, short_kept = qwen_native_plan(handle, qwen, rows["input_ids"], rows["attention_mask"],
                                            rows["image_grid_thw"])
        last = handle.last_kept[str(handle.stages[-1])]
    finally:
        handle.detach()
    bound = native_qwen_prefill(native, **rows, plan=plan)
    torch.testing.assert_close(bound, pruned, rtol=0, atol=0)
    inside = sorted(st.site for st in handle.stages if st.site != "llm.0")
    assert sorted(f"llm.{k}" for k in plan.llm) == inside
    assert (plan.entering is not None) == (handle.stages[0].site == "llm.0")
    # short_kept: per image (6, 16, 16, 6 tokens) the tokens that reach the last layer
    if inside:  # the last stage's rows are prompts
        per_row = [len(short_kept[0]) + len(short_kept[1]), len(short_kept[2]) + len(short_kept[3])]
        assert per_row == [int((row >= 0).sum()) for row in last]
    else:  # its rows are images; and a natively short prompt of the same tokens is the same prefill
        with torch.no_grad():
            short = native.forward(**rows, kept=short_kept, logits_to_keep=1).logits
        torch.testing.assert_close(short, pruned, rtol=0, atol=0)
        assert [k.tolist() for k in short_kept] == [k.tolist() for k in kept_of(handle)]


def test_the_native_bound_stands_in_for_tokens_a_method_made(qwen, rows):
    """SparseVLM's recycled tokens (positions kept, ours on Qwen-VL) and its per-row counts: the bound keeps as
    many of the tokens it dropped, so each layer after a stage runs on as many columns as the pruned pass."""
    layers = (2,) if qwen.deepstack_levels else (1, 2)  # Qwen3-VL: made tokens after its DeepStack layers
    handle = attach(qwen, {"name": "sparsevlm", "positions": "original", "layers": layers, "scale": 0.8,
                           "bias": 0.0}, 64)
    try:
        with torch.no_grad():
            qwen.forward(**rows, logits_to_keep=1)
        plan, short_kept = qwen_native_plan(handle, qwen, rows["input_ids"], rows["attention_mask"],
                                            rows["image_grid_thw"])
    finally:
        handle.detach()
    kept = list(handle.last_kept.values())
    assert int((kept[0] == -3).sum()) > 0, "the first stage recycled tokens"
    widths = [int(((row >= 0) | (row == -3)).sum(1).max()) for row in kept]  # kept and made, the widest row
    assert [plan.llm[k].shape[1] for k in layers] == widths
    assert len(short_kept[0]) + len(short_kept[1]) == widths[-1]  # row 0's two images reach the last layer


def test_the_unpruned_plan_is_the_unpruned_model(qwen, native, rows):
    with torch.no_grad():
        plain = qwen.forward(**rows, logits_to_keep=1).logits
    torch.testing.assert_close(native_qwen_prefill(native, **rows, plan=QwenPlan(22)), plain, rtol=0, atol=0)


def test_rows_keeping_different_counts_are_refused(qwen, mixed):
    handle = attach(qwen, "fastv", 0.5, site="llm.2")  # rows of 16 and 22 visual tokens keep 8 and 11
    try:
        with torch.no_grad():
            qwen.forward(**mixed, logits_to_keep=1)
        with pytest.raises(TokensieveError, match="rows that keep as many visual tokens"):
            qwen_native_plan(handle, qwen, mixed["input_ids"], mixed["attention_mask"], mixed["image_grid_thw"])
    finally:
        handle.detach()


def test_the_7b_shape_is_qwen25_vl_7b_and_the_cpu_one_keeps_its_tokens_and_layer_pattern():
    big, cpu = qwen_bench.QwenBenchShape.qwen25_vl_7b(), qwen_bench.QwenBenchShape()
    config = big.config()  # Qwen2.5-VL-7B-Instruct's config.json
    tc, vc = config.text_config, config.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size, tc.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert tc.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vc.depth, vc.hidden_size, vc.num_heads, vc.intermediate_size, vc.out_hidden_size) == (32, 1280, 16, 3420, 3584)
    assert (vc.patch_size, vc.spatial_merge_size, vc.window_size, list(vc.fullatt_block_indexes)) == (14, 2, 112,
                                                                                                     [7, 15, 23, 31])
    assert big.grid == (1, 58, 92) and big.n_visual == 1334  # 1288 x 812 px
    assert (cpu.n_visual, cpu.text_tokens) == (big.n_visual, big.text_tokens)
    assert cpu.fullatt_blocks == big.fullatt_blocks[:1] == (cpu.vision_layers - 1,)  # 7 window blocks, then a full one
    assert sum(cpu.mrope_section) == cpu.llm_hidden // cpu.llm_heads // 2
    shares = []
    for shape in (big, cpu):  # the tower's share of the linear FLOPs, kept
        flops = qwen_prefill_flops(shape.config(), shape.grid, [shape.text_tokens + shape.n_visual] * shape.llm_layers,
                                   attention_scores=False)
        shares.append((flops["vision"] + flops["projector"]) / flops["total"])
    assert shares[1] == pytest.approx(shares[0], abs=0.02)


@pytest.mark.parametrize("budget_site", [None, ("random", 0.5, "llm.2"), ("random", 0.5, "llm.0")])  # no scoring FLOPs
def test_the_linear_flops_match_torchs_counter(budget_site):
    torch.manual_seed(0)
    backbone, batch = TINY.build(), TINY.inputs(1)
    handle = None if budget_site is None else attach(backbone, budget_site[0], budget_site[1], site=budget_site[2])
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:  # the CPU's SDPA (scores) is not counted
            backbone.forward(**batch, logits_to_keep=1)
        tokens = qwen_bench.qwen_llm_tokens(TINY.llm_layers, TINY.text_tokens, TINY.n_visual, handle)
    finally:
        if handle is not None:
            handle.detach()
    linear = qwen_prefill_flops(backbone.config, TINY.grid, tokens, attention_scores=False)["total"]
    assert linear == counter.get_total_flops()


def test_bench_speed_on_a_qwen_shape_reports_every_figure(monkeypatch, capsys):
    monkeypatch.setattr(qwen_bench, "QwenBenchShape", lambda: TINY)
    common = ["--shape", "qwen2.5-vl-cpu", "--budget", "0.5", "--repeats", "1", "--new-tokens", "2", "--json"]
    assert main(["bench", "speed", "--method", "fastv,dart,pyramiddrop", "--param", "pyramiddrop.positions=original",
                 "--param", "pyramiddrop.layers=[1,2]", *common]) == 0
    inside = json.loads(capsys.readouterr().out)
    assert main(["bench", "speed", "--method", "random,divprune", "--site", "llm.0", *common]) == 0
    before = json.loads(capsys.readouterr().out)
    assert inside["shape"]["n_visual"] == 8 and inside["shape"]["image_width"] == 112
    rows = inside["rows"] + before["rows"]
    pyramiddrop = "pyramiddrop(positions=original, layers=[1, 2])"  # a row names the parameters it was given
    assert [(r["method"], r["site"]) for r in rows] == [("fastv", "llm.2"), ("dart", "llm.2"), (pyramiddrop, "llm.1"),
                                                        ("random", "llm.0"), ("divprune", "llm.0")]
    assert rows[2]["params"] == {"positions": "original", "layers": [1, 2]}
    for r in rows:
        assert r["native_bound_ms"] > 0 and r["ideal_speedup"] > 1
        assert r["ratio_to_bound"] == pytest.approx(r["native_bound_ms"] / r["prefill_ms_pruned"], rel=1e-2)
        for variant in ("full", "pruned", "short"):
            assert r[f"decode_ms_per_token_{variant}"] > 0 and r[f"generate_s_{variant}"] > 0
            assert r[f"kv_cache_bytes_{variant}"] > 0 and r[f"peak_memory_mb_{variant}"] is None
        assert r["kv_cache_bytes_short"] < r["kv_cache_bytes_full"]
    for r in before["rows"]:  # before the LLM the pruned cache is the natively short one
        assert r["kv_ratio_to_short"] == 1.0
    assert {n["visual_tokens_kept"] for n in inside["native_llm"]} == {4}


def test_the_7b_qwen_shape_is_refused_on_a_cpu(capsys):
    assert main(["bench", "speed", "--shape", "qwen2.5-vl-7b", "--device", "cpu"]) == 2
    assert "use --shape qwen2.5-vl-cpu here" in capsys.readouterr().err
