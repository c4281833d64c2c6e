"""``tokensieve bench speed|capacity|train``: measured prefill speed of methods, the largest batch
under a memory limit with and without pruning, and what a training config costs per step."""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from tokensieve.cli_args import comma_list, memory_size, positive_int
from tokensieve.errors import TokensieveError

# The model shapes of bench speed and bench capacity.
SHAPES = ["cpu", "llava-7b", "qwen2.5-vl-cpu", "qwen2.5-vl-7b", "llava-next-cpu", "llava-next-7b"]
# Each 7B shape and the CPU-sized variant to use instead on a CPU.
CPU_VARIANTS = {"llava-7b": "cpu", "qwen2.5-vl-7b": "qwen2.5-vl-cpu", "llava-next-7b": "llava-next-cpu"}


def _bench_shape(args: argparse.Namespace):
    """The benchmark's model shape, once ``args.device`` is known to be able to hold it."""
    from tokensieve.devices import require_device
    from tokensieve.evaluate import next_bench, qwen_bench
    from tokensieve.evaluate.speed import BenchShape

    require_device(args.device, "--device")
    if args.shape in CPU_VARIANTS and not args.device.startswith("cuda"):
        # 7 B parameters: 28 GB in float32, more than a workstation's memory, and hours per case.
        raise TokensieveError(f"--shape {args.shape} is a 7B model: run it on a GPU (--device cuda --dtype bfloat16), "
                              f"or use --shape {CPU_VARIANTS[args.shape]} here")
    shapes = {"cpu": BenchShape, "llava-7b": lambda: BenchShape.llava7b(), "qwen2.5-vl-cpu": qwen_bench.QwenBenchShape,
              "qwen2.5-vl-7b": lambda: qwen_bench.QwenBenchShape.qwen25_vl_7b(),
              "llava-next-cpu": next_bench.NextBenchShape,
              "llava-next-7b": lambda: next_bench.NextBenchShape.llava_next_7b()}
    return shapes[args.shape]()


def _methods_and_ratios(args: argparse.Namespace) -> tuple[list, list[float]]:
    """``--method`` (with ``--param``) and ``--budget`` of bench speed or capacity, checked: known methods,
    budget ratios."""
    from tokensieve.commands.evaluation import _with_parameters
    from tokensieve.method import Budget
    from tokensieve.methods import create_method

    methods = _with_parameters(comma_list(args.method), args.param)
    budgets = [float(Budget.parse(b).ratio or 0) for b in comma_list(args.budget)]
    for name in methods:
        create_method(name)
    if not all(budgets):
        raise TokensieveError(f"bench {args.bench_command} takes budget ratios (0.33), not token counts")
    return methods, budgets


def _bench_speed(args: argparse.Namespace) -> None:
    import torch

    from tokensieve.evaluate.speed import (
        native_llm_reference,
        shape_summary,
        speed_benchmark,
    )

    methods, budgets = _methods_and_ratios(args)
    if args.new_tokens < 2:
        raise TokensieveError("--new-tokens must be at least 2: time per token is read between the first and the "
                              "last new token")
    shape = _bench_shape(args)
    dtype = getattr(torch, args.dtype)
    backend = args.compile_backend if args.compile else None
    if backend and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise TokensieveError(f"--compile-backend {backend}: not a torch.compile backend (e.g. inductor, "
                              "cudagraphs, aot_eager)")
    rows = speed_benchmark(shape, tuple(methods), tuple(budgets), repeats=args.repeats, threads=args.threads,
                           device=args.device, dtype=dtype, progress=not args.json, batch=args.batch,
                           new_tokens=args.new_tokens, compile_backend=backend, site=args.site,
                           profile=args.profile)
    kept = sorted({r["visual_tokens_kept"] for r in rows}, reverse=True)
    native = native_llm_reference(shape, kept, repeats=args.repeats, device=args.device, dtype=dtype,
                                  batch=args.batch)
    if args.json:
        summary = shape_summary(shape, args.device, dtype, args.batch, args.new_tokens, backend)
        print(json.dumps({"shape": summary, "rows": rows, "native_llm": native}, indent=2))
        return
    print(f"{'method':10s} {'site':9s} {'budget':>6s} {'full ms':>8s} {'pruned ms':>9s} {'speedup':>7s} "
          f"{'ideal':>6s} {'scoring':>7s}")
    for r in rows:
        print(f"{r['method']:10s} {r['site']:9s} {r['budget']:6.2f} {r['prefill_ms_full']:8.1f} "
              f"{r['prefill_ms_pruned']:9.1f} {r['speedup']:7.2f} {r['ideal_speedup']:6.2f} "
              f"{r['scoring_overhead']:7.3f}  " + " ".join("ok" if ok else "MISSED" for ok in r["targets"].values()))
    if backend:
        print(f"prefills torch.compile'd ({backend}); first calls (compiling), s, pruned/full/bound: " +
              ", ".join(f"{r['method']}@{r['budget']:.2f} " + "/".join(f"{r['compile_s'][k]:.1f}" for k in
                                                                      ("pruned", "full", "bound")) for r in rows))
    print("the unpruned LLM alone on a natively shorter prompt (what perfect removal could reach here):")
    for n in native:
        print(f"  {n['visual_tokens_kept']:4d} visual tokens: {n['llm_ms_full']:8.1f} -> {n['llm_ms_short']:7.1f} ms, "
              f"speedup {n['speedup']:5.2f} of token ratio {n['token_ratio']:5.2f} ({n['share_of_token_ratio']:.3f}); "
              f"with the unpruned tower ({n['tower_ms']:.1f} ms) the most a projector-site method could reach: "
              f"{n['projector_site_bound']:.2f}")
    _print_bounds_and_decoding(rows, args.new_tokens)
    if args.profile:
        _print_profiles(rows)


def _print_bounds_and_decoding(rows: list[dict], new_tokens: int) -> None:
    """Each row's native bound and its decoding figures (pruned; unpruned and natively short)."""
    print(f"per row: the same prefill built natively with no pruning code (bound), and decoding {new_tokens} new "
          "tokens (unpruned / pruned / natively short prompt):")
    print(f"{'method':10s} {'site':9s} {'budget':>6s} {'bound ms':>8s} {'ratio':>6s} {'decode ms/token':>23s} "
          f"{'ratio':>6s} {'KV MiB':>20s} {'ratio':>6s} {'generate s':>22s}")
    for r in rows:
        decode = "/".join(f"{r[f'decode_ms_per_token_{v}']:.2f}" for v in ("full", "pruned", "short"))
        kv = "/".join(f"{r[f'kv_cache_bytes_{v}'] / 2**20:.2f}" for v in ("full", "pruned", "short"))
        whole = "/".join(f"{r[f'generate_s_{v}']:.3f}" for v in ("full", "pruned", "short"))
        peak = "" if r["peak_memory_mb_pruned"] is None else \
            "  peak MiB " + "/".join(f"{r[f'peak_memory_mb_{v}']:.0f}" for v in ("full", "pruned", "short"))
        print(f"{r['method']:10s} {r['site']:9s} {r['budget']:6.2f} {r['native_bound_ms']:8.1f} "
              f"{r['ratio_to_bound']:6.3f} {decode:>23s} {r['decode_ratio_to_short']:6.3f} {kv:>20s} "
              f"{r['kv_ratio_to_short']:6.3f} {whole:>22s}{peak}")


def _print_profiles(rows: list[dict]) -> None:
    """Per row, the operators on which one profiled pruned prefill spends most beyond its native bound."""
    print("per row: one profiled call of the pruned prefill and of its bound, the operators differing most (ms):")
    for r in rows:
        p = r["op_profile"]
        print(f"{r['method']} @ {r['site']} {r['budget']:.2f}: pruned {p['pruned_ms']:.1f}, bound {p['bound_ms']:.1f}; "
              + ", ".join(f"{op['op']} {op['extra_ms']:+.1f}" for op in p["ops"][:6]))


def _bench_capacity(args: argparse.Namespace) -> None:
    import torch

    from tokensieve.evaluate.capacity import capacity_rows

    methods, budgets = _methods_and_ratios(args)
    if args.new_tokens < 2:
        raise TokensieveError("--new-tokens must be at least 2: throughput counts the generated tokens")
    shape = _bench_shape(args)
    rows = capacity_rows(shape, tuple(methods), tuple(budgets), args.memory_limit, args.max_batch, args.new_tokens,
                         args.repeats, args.device, getattr(torch, args.dtype), args.site, progress=not args.json)
    if args.json:
        print(json.dumps({"memory_limit_bytes": args.memory_limit, "max_batch": args.max_batch,
                          "new_tokens": args.new_tokens, "device": args.device, "dtype": args.dtype,
                          "shape": args.shape, "rows": rows}, indent=2))
        return
    print(f"largest batch whose generate() of {args.new_tokens} tokens peaks under {args.memory_limit / 2**30:.2f} GiB "
          f"(at most {args.max_batch}), and the throughput there:")
    print(f"{'method':10s} {'budget':>6s} {'batch':>6s} {'peak MiB':>9s} {'tokens/s':>9s} {'x batch':>8s} "
          f"{'x tokens/s':>10s}")
    for r in rows:
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        print(f"{r['method']:10s} {r['budget']:6.2f} {r['largest_batch']:6d} {peak:>9s} "
              f"{r.get('tokens_per_s', 0):9.1f} {r.get('batch_ratio', 1):8.2f} {r.get('throughput_ratio', 1):10.2f}")


def _bench_train(args: argparse.Namespace) -> None:
    import torch

    from tokensieve.config import load_config
    from tokensieve.data.synthetic import SceneSpec
    from tokensieve.testbed.processor import build_processor
    from tokensieve.train.speed import train_step_benchmark
    from tokensieve.train.two_stage_config import TwoStageConfig

    shape = _bench_shape(args)
    # Synthetic scenes stand in for the config's data; the device and dtype are the command's.
    forced = ["data.kind=synthetic", "data.path=null", "data.image_folder=null", f"run.device={args.device}",
              f"run.dtype={args.dtype}"]
    with resources.as_file(resources.files("tokensieve") / "configs" / "two_stage_llava15_7b.yaml") as packaged:
        cfg = load_config(TwoStageConfig, args.config or packaged, [*args.set, *forced])
    processor = build_processor(SceneSpec(image_size=shape.image_size, patch_size=shape.patch_size))
    result = train_step_benchmark(cfg, shape, processor, args.steps, dtype=getattr(torch, args.dtype),
                                  progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    memory = "" if result["peak_memory_gib"] is None else f", peak memory {result['peak_memory_gib']:.1f} GiB"
    print(f"{result['step_s_median']:.3f} s per step of {result['batch_size']} samples "
          f"({result['samples_per_s']:.1f} samples/s){memory}; {result['config_steps']} steps: "
          f"about {result['projected_hours']:.2f} h without validation")


def add(sub) -> None:
    """Add ``bench speed``, ``bench capacity`` and ``bench train``."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    speed = bench.add_parser("speed", help="measured prefill speedup vs the FLOPs ideal on a LLaVA-, "
                             "LLaVA-NeXT- or Qwen2.5-VL-shaped model")
    speed.add_argument("--method", default="fastv,divprune", help="methods, each at its default site")
    speed.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                       help="set a parameter of a method in --method (repeatable), e.g. pyramiddrop.positions=original")
    speed.add_argument("--site", default=None,
                       help="where every method of --method reduces (default: each method's own site), e.g. llm.0 "
                            "for random on Qwen-VL, which has no projector site")
    speed.add_argument("--budget", default="0.33,0.22,0.11", help="budget ratios")
    speed.add_argument("--shape", default="cpu", choices=SHAPES,
                       help="cpu: LLaVA, 8 layers x 512 (default); llava-7b: LLaVA-1.5-7B's shape; qwen2.5-vl-cpu: "
                            "Qwen2.5-VL, 8 layers x 512, a 1288x812 image (1,334 visual tokens); qwen2.5-vl-7b: "
                            "Qwen2.5-VL-7B's shape, the same image; llava-next-cpu: LLaVA-NeXT, 8 layers x 512, a "
                            "672x672 image (base + 4 crops: 2,880 visual tokens and 48 newlines); llava-next-7b: "
                            "LLaVA-NeXT-7B's shape, the same image (the 7B shapes need a GPU)")
    speed.add_argument("--repeats", type=positive_int, default=7, help="timed runs per case (median)")
    speed.add_argument("--batch", type=positive_int, default=1, help="prompts per prefill")
    speed.add_argument("--new-tokens", type=positive_int, default=8,
                       help="tokens generated per prompt for the decoding figures (at least 2; default 8)")
    speed.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    speed.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    speed.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="the model's dtype (default float32)")
    speed.add_argument("--compile", action="store_true",
                       help="run the pruned and unpruned prefills and the native bound torch.compile'd "
                            "(first calls compile, untimed; compile_s per row)")
    speed.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend with --compile (default inductor; aot_eager needs no C compiler)")
    speed.add_argument("--profile", action="store_true",
                       help="also profile one pruned prefill and one of its native bound per row, operator by "
                            "operator (op_profile: where the pruned one spends more)")
    speed.add_argument("--json", action="store_true", help="print the rows as JSON")
    speed.set_defaults(func=_bench_speed)

    capacity = bench.add_parser("capacity", help="the largest batch under a memory limit with and without pruning, "
                                "and its throughput")
    capacity.add_argument("--memory-limit", required=True, type=memory_size,
                          help="peak memory one generate() may use (24GiB); on a CPU, the whole process's")
    capacity.add_argument("--method", default="divprune", help="methods, each at its default site")
    capacity.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                          help="set a parameter of a method in --method (repeatable)")
    capacity.add_argument("--site", default=None, help="where every method reduces (default: each method's own)")
    capacity.add_argument("--budget", default="0.22", help="budget ratios")
    capacity.add_argument("--shape", default="cpu", choices=SHAPES,
                          help="as bench speed's (the 7B shapes need a GPU)")
    capacity.add_argument("--max-batch", type=positive_int, default=256, help="the largest batch tried (default 256)")
    capacity.add_argument("--new-tokens", type=positive_int, default=16, help="tokens per prompt (default 16)")
    capacity.add_argument("--repeats", type=positive_int, default=3, help="timed generate() calls (median)")
    capacity.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    capacity.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                          help="the model's dtype (default float32)")
    capacity.add_argument("--json", action="store_true", help="print the rows as JSON")
    capacity.set_defaults(func=_bench_capacity)

    train_bench = bench.add_parser("train", help="two-stage training step time and memory on a random model of a "
                                   "real shape (what a config costs before renting GPU hours)")
    train_bench.add_argument("config", type=Path, nargs="?", default=None,
                             help="training config (default: the packaged two_stage_llava15_7b.yaml)")
    train_bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config key (repeatable)")
    train_bench.add_argument("--shape", default="llava-7b", choices=["cpu", "llava-7b"],
                             help="llava-7b: LLaVA-1.5-7B's shape (default); cpu: 8 layers x 512")
    train_bench.add_argument("--steps", type=positive_int, default=10, help="timed steps (median)")
    train_bench.add_argument("--device", default="cuda", help="cuda[:i], or cpu with --shape cpu")
    train_bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                             help="the frozen backbone's dtype")
    train_bench.add_argument("--json", action="store_true", help="print the result as JSON")
    train_bench.set_defaults(func=_bench_train)
