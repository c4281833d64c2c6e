"""`tokensieve eval` (methods side by side) and `tokensieve bench speed` on tiny shapes.

No timing is asserted here: speed targets are checked by the benchmark command itself.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from transformers import LlavaConfig

from tokensieve.cli import main
from tokensieve.evaluate.flops import TokenCounts, full_prefill_flops, prefill_flops
from tokensieve.evaluate.report import load_report
from tokensieve.evaluate import speed
from tokensieve.evaluate.speed import BenchShape, bench_config, ideal_speedup, native_llm_reference, speed_benchmark

MICRO = BenchShape(llm_layers=3, llm_hidden=32, llm_heads=2, llm_intermediate=64, vision_layers=1,
                   vision_hidden=16, vision_heads=2, image_size=56, patch_size=14, text_tokens=8, vocab=100)


def test_ideal_speedup_follows_the_tokens_each_layer_sees():
    config, n, text = bench_config(MICRO), MICRO.n_visual, MICRO.text_tokens
    full = TokenCounts([n + 1], n, [n + text] * 3)
    assert ideal_speedup(config, full, full) == 1.0
    before_llm = ideal_speedup(config, full, TokenCounts([n + 1], 4, [4 + text] * 3))
    inside = ideal_speedup(config, full, TokenCounts([n + 1], n, [n + text] * 2 + [4 + text]))
    assert before_llm > inside > 1.0
    # Linear FLOPs: the tokens' share of the matmuls, without the quadratic attention scores.
    linear = prefill_flops(config, *full, attention_scores=False)
    assert linear["llm_layers"][0] == 2 * (n + text) * (4 * 32 * 32 + 3 * 32 * 64)
    assert prefill_flops(config, *full)["llm_layers"][0] == linear["llm_layers"][0] + 4 * (n + text) ** 2 * 32


def test_speed_rows_take_the_ideal_from_the_tokens_each_block_saw():
    shape = replace(MICRO, vision_layers=2)  # ToMe merges inside both blocks: 16 -> 12 -> 8 patches
    row, = speed_benchmark(shape, ("tome",), (0.5,), repeats=1, progress=False)
    config, n, text, k = bench_config(shape), shape.n_visual, shape.text_tokens, row["visual_tokens_kept"]
    full = TokenCounts([n + 1] * 2, n, [n + text] * 3)
    pruned = TokenCounts([n + 1, 12 + 1], k, [k + text] * 3)  # block 1 sees what block 0 left
    assert (row["site"], k) == ("vision.0", 8)
    assert row["ideal_speedup"] == pytest.approx(ideal_speedup(config, full, pruned), abs=1e-3)


def test_speed_benchmark_rows_on_a_micro_model():
    rows = speed_benchmark(MICRO, ("fastv", "random"), (0.5, 0.25), repeats=1, progress=False)
    assert [(r["method"], r["site"], r["visual_tokens_kept"]) for r in rows] == [
        ("fastv", "llm.2", 8), ("fastv", "llm.2", 4), ("random", "projector", 8), ("random", "projector", 4)]
    for r in rows:
        assert r["prefill_ms_full"] > 0 and r["prefill_ms_pruned"] > 0 and 0 <= r["scoring_overhead"] < 1
        assert r["speedup"] == pytest.approx(r["prefill_ms_full"] / r["prefill_ms_pruned"], rel=1e-2)
        assert set(r["targets"]) == {"speedup >= 0.95 x ideal_speedup", "scoring_overhead <= 0.03"}


def test_scoring_shares_wait_for_the_device_at_both_edges_of_each_scoring_block():
    from tokensieve.attach import attach
    from tokensieve.backbones import LlavaBackbone
    from tokensieve.evaluate.timing import scoring_shares

    backbone = LlavaBackbone(speed.build_bench_model(MICRO))
    inputs = speed.bench_inputs(MICRO)
    handle = attach(backbone, "fastv", 0.5, mode="hard")
    waits = []
    shares = scoring_shares(lambda: backbone.forward(**inputs), handle, 3, sync=lambda: waits.append(1))
    # per run: once before and after it, and once at each edge of FastV's two scoring blocks
    # (the attention it reads at layer K-1, the choice at layer K)
    assert len(waits) == 3 * (2 + 2 * 2)
    assert len(shares) == 3 and all(0 < s < 1 for s in shares)
    waits.clear()
    backbone.forward(**inputs)
    assert not waits  # the timed runs do not wait
    handle.detach()


def test_native_reference_times_the_llm_alone_on_a_shorter_prompt():
    ref = native_llm_reference(MICRO, [8, 4], repeats=1)
    assert [r["visual_tokens_kept"] for r in ref] == [8, 4]
    for r in ref:
        short = r["visual_tokens_kept"] + MICRO.text_tokens
        assert r["token_ratio"] == pytest.approx((MICRO.n_visual + MICRO.text_tokens) / short, abs=1e-3)
        assert r["llm_ms_full"] > 0 and r["llm_ms_short"] > 0
        assert r["share_of_token_ratio"] == pytest.approx(r["speedup"] / r["token_ratio"], rel=1e-2)
        assert r["tower_ms"] > 0
        bound = (r["tower_ms"] + r["llm_ms_full"]) / (r["tower_ms"] + r["llm_ms_short"])
        assert r["projector_site_bound"] == pytest.approx(bound, rel=1e-2)


def test_bench_speed_prints_rows_and_the_native_reference(monkeypatch, capsys):
    monkeypatch.setattr(speed, "BenchShape", lambda: MICRO)
    assert main(["bench", "speed", "--method", "random", "--budget", "0.5,0.25", "--repeats", "1", "--batch", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["visual_tokens_kept"] for r in out["rows"]] == [8, 4]  # per prompt
    assert [r["visual_tokens_kept"] for r in out["native_llm"]] == [8, 4]
    assert (out["shape"]["n_visual"], out["shape"]["batch"]) == (MICRO.n_visual, 2)


def test_bench_speed_profile_compares_the_pruned_prefill_with_its_bound_op_by_op(monkeypatch, capsys):
    monkeypatch.setattr(speed, "BenchShape", lambda: MICRO)
    assert main(["bench", "speed", "--method", "fastv", "--budget", "0.5", "--repeats", "1", "--profile"]) == 0
    assert "the operators differing most" in capsys.readouterr().out
    row, = speed_benchmark(MICRO, ("fastv",), (0.5,), repeats=1, progress=False, profile=True)
    profiled = row["op_profile"]
    assert profiled["pruned_ms"] > 0 and profiled["bound_ms"] > 0 and 0 < len(profiled["ops"]) <= 12
    extra = [abs(op["extra_ms"]) for op in profiled["ops"]]
    assert extra == sorted(extra, reverse=True)  # the largest differences first
    for op in profiled["ops"]:
        assert op["extra_ms"] == pytest.approx(op["pruned_ms"] - op["bound_ms"], abs=2e-3)
    names = {op["op"] for op in profiled["ops"]}
    assert any(name.startswith("aten::") for name in names)


def test_bench_train_times_real_training_steps_on_a_random_model_of_the_shape(monkeypatch, capsys):
    monkeypatch.setattr(speed, "BenchShape", lambda: replace(MICRO, image_size=112))  # 8 x 8: room for scenes
    args = ["bench", "train", "--shape", "cpu", "--device", "cpu", "--steps", "2", "--set", "pruner.pruning_layers=[1,2]",
            "--set", "merger.d_internal=16", "--set", "pruner.d_internal=16", "--set", "discriminator.d_internal=16",
            "--set", "discriminator.layers=[-1,-2]", "--set", "optim.batch_size=2", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["steps_timed"], out["batch_size"], out["config_steps"]) == (2, 2, 5000)  # the 7B config's run
    assert out["step_s_median"] > 0 and out["peak_memory_gib"] is None  # no CUDA here
    assert out["projected_hours"] == pytest.approx(out["step_s_median"] * 5000 / 3600, abs=0.01)
    assert out["trainable_parameters"] > 0 and out["backbone_parameters"] > out["trainable_parameters"]
    assert len(out["last_step"]["keep_ratio"]) == 2  # one per pruner head: the heads trained
    # the 7B config's heads do not fit a 3-layer LLM: named, not a trace
    assert main(["bench", "train", "--shape", "cpu", "--device", "cpu", "--steps", "1"]) == 2
    assert "pruner.pruning_layers [10, 20, 31]" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["speed", "train"])
def test_the_7b_shape_is_refused_on_a_cpu_before_any_model_is_built(command, capsys):
    assert main(["bench", command, "--shape", "llava-7b", "--device", "cpu"]) == 2
    assert "--shape llava-7b is a 7B model: run it on a GPU" in capsys.readouterr().err


def test_eval_compares_methods_with_the_unpruned_model(tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random,fastv", "--budget", "0.5,8",
                 "--samples", "10", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["visual_tokens_kept"]) for r in rows] == [
        ("none", 64), ("random", 32), ("random", 8), ("fastv", 32), ("fastv", 8)]
    assert all(0 <= r["accuracy"] <= 1 and len(r["per_family"]) == 5 for r in rows)
    baseline, random_half, _, fastv_half, _ = rows
    text = baseline["tokens_per_llm_layer"][0] - 64
    full = full_prefill_flops(LlavaConfig.from_pretrained(tiny_llava_dir), text)
    assert baseline["flops"] == {k: full[k] for k in baseline["flops"]}
    assert random_half["tokens_per_llm_layer"] == [text + 32] * 3  # removed before the LLM
    assert fastv_half["tokens_per_llm_layer"] == [text + 64] * 2 + [text + 32]  # removed before layer 2
    assert all(r["flops_ratio"] < 1 for r in rows[1:])


def test_eval_writes_a_report_with_plots(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random", "--budget", "8",
                 "--samples", "6", "--json", "--out", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert load_report(out)["rows"] == rows
    assert load_report(out)["meta"]["command"] == (
        f"tokensieve eval --model {tiny_llava_dir} --method random --budget 8 --samples 6 --json --out {out}")
    for name in ("report.md", "accuracy_vs_tokens.png", "tokens_per_layer.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("args,needle", [
    (["--method", "random", "--budget", "65"], "budget of 65 tokens is larger than the 64 visual tokens"),
    (["--method", "random", "--budget", "0.5", "--site", "llm.9"], "llm.9 is past its depth"),
    (["--method", "fastv", "--budget", "0.5", "--site", "projector"], "cannot act at projector"),
    (["--method", "nope", "--budget", "0.5"], "unknown method 'nope'; known methods: anchor"),
])
def test_eval_bad_input_is_one_line(tiny_llava_dir, capsys, args, needle):
    assert main(["eval", "--model", str(tiny_llava_dir), "--samples", "4", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"tokensieve: error: {err.split('tokensieve: error: ')[1].strip()}"
    assert needle in err.strip().splitlines()[-1]


def test_the_object_oracle_takes_one_token_per_object_before_a_second():
    from tokensieve.data.synthetic import make_sample
    from tokensieve.data.synthetic_eval import object_oracle

    sample = make_sample(0, 3)
    n = len(sample.objects)
    firsts = {o.patch_indices(10)[0] for o in sample.objects}
    assert set(object_oracle(n, 10)(sample).tolist()) == firsts
    two = object_oracle(n + 1, 10)(sample).tolist()
    assert len(two) == n + 1 and firsts < set(two)
    assert object_oracle(100, 10)(sample).tolist() == list(sample.object_patches)  # objects only, never more


def test_eval_adds_the_object_oracle_at_each_budget(tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random", "--budget", "4,64",
                 "--oracle", "--samples", "10", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    oracle = [r for r in rows if r["method"] == "object_oracle"]
    assert [r["budget"] for r in oracle] == ["4", "64"]
    assert oracle[0]["visual_tokens_kept"] <= 4 and 4 < oracle[1]["visual_tokens_kept"] < 64
    text = rows[0]["tokens_per_llm_layer"][0] - 64
    assert oracle[1]["tokens_per_llm_layer"] == [text + oracle[1]["visual_tokens_kept"]] * 3


def test_an_interrupted_eval_resumes_from_its_sample_lines(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    import tokensieve.evaluate.scorer as scorer

    args = ["eval", "--model", str(tiny_llava_dir), "--method", "random,fastv", "--budget", "8",
            "--samples", "10", "--batch-size", "4", "--timing-samples", "0", "--json"]  # timings differ per run
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads(capsys.readouterr().out)

    real_predict, calls = scorer.predict, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # the baseline's 3 batches, then random's first, then stop
            raise KeyboardInterrupt
        return real_predict(*a, **k)

    monkeypatch.setattr(scorer, "predict", interrupted)
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 130  # Ctrl-C's exit status
    assert capsys.readouterr().err.strip().endswith("samples.jsonl; rerun the same command to continue")
    lines = (tmp_path / "resumed" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 10 + 4
    monkeypatch.setattr(scorer, "predict", real_predict)
    with open(tmp_path / "resumed" / "samples.jsonl", "a") as f:
        f.write('{"run": "random@projector:8", "i')  # a line cut short by the interruption
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed == whole
    records = [json.loads(line) for line in (tmp_path / "resumed" / "samples.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 30
    for row in resumed:
        run = "none" if row["method"] == "none" else f"{row['method']}@{row['site']}:{row['budget']}"
        mine = [r["score"] for r in records if r["run"] == run]
        assert len(mine) == 10 and row["accuracy"] == round(sum(mine) / len(mine), 4)


def test_an_eval_folder_from_other_settings_is_refused(tiny_llava_dir, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_llava_dir), "--method", "random", "--budget", "8", "--out", str(tmp_path)]
    assert main([*base, "--samples", "4"]) == 0
    assert main([*base, "--samples", "6"]) == 2
    assert "other settings (data)" in capsys.readouterr().err


def test_every_row_has_measured_latency_and_its_kv_cache(tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random", "--budget", "8", "--oracle",
                 "--samples", "6", "--timing-samples", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    config = LlavaConfig.from_pretrained(tiny_llava_dir).text_config
    per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2
    for row in rows:
        assert row["ttft_ms"] > 0 and row["decode_ms_per_token"] >= 0 and row["peak_memory_mb"] is None  # CPU
        assert row["kv_cache_bytes"] == per_token * sum(row["tokens_per_llm_layer"])
    assert rows[1]["kv_cache_bytes"] < rows[0]["kv_cache_bytes"]


def test_eval_sets_method_parameters_with_param(tiny_llava_dir, capsys):
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "pyramiddrop", "--budget", "0.5",
                 "--param", "pyramiddrop.layers=[1,2]", "--samples", "4", "--timing-samples", "0", "--json"]) == 0
    _, row = json.loads(capsys.readouterr().out)
    assert row["method"] == "pyramiddrop(layers=[1, 2])"  # a row names the parameters it was given
    assert row["visual_tokens_per_stage"] == {"pyramiddrop@llm.1:0.5": 32, "pyramiddrop@llm.2:0.5": 16}
