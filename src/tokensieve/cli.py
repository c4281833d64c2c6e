"""The ``tokensieve`` command line. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import yaml

from tokensieve import __version__
from tokensieve.cli_args import (
    OneLineParser,
    non_negative_int,
    out_folder,
    positive_int,
)
from tokensieve.errors import TokensieveError

DESCRIPTION = ("Prune and merge visual tokens in LLaVA-style models and CLIP image towers, and measure "
               "accuracy and speed. Bad input ends in one line naming the problem, and exit status 2.")


def _testbed_train(args: argparse.Namespace) -> None:
    from tokensieve.testbed.model import TestbedSize
    from tokensieve.testbed.train import TestbedTrainConfig, train_testbed

    given = {key: getattr(args, key) for key in ("tower_steps", "llm_steps", "mention_layer", "relation_layer")
             if getattr(args, key) is not None}
    if args.llm_layers is not None:
        given["size"] = TestbedSize(text_layers=args.llm_layers)
    cfg = TestbedTrainConfig(**given)
    out = train_testbed(args.out, cfg, resume=not args.no_resume)
    print(f"testbed checkpoint written to {out}")


def _testbed_eval(args: argparse.Namespace) -> None:
    from tokensieve.backbones import LlavaBackbone
    from tokensieve.testbed.evaluate import evaluate_testbed

    backbone = LlavaBackbone.from_pretrained(args.model)
    if backbone.processor is None:
        raise TokensieveError(f"{args.model} has no processor files; the testbed evaluation needs one")
    report = evaluate_testbed(backbone, n_samples=args.samples, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key not in ("per_family", "targets"):
            print(f"{key:28s} {value}")
    print("per family: " + ", ".join(f"{k} {v:.3f}" for k, v in report["per_family"].items()))
    for name, ok in report["targets"].items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")


def _ask(args: argparse.Namespace) -> None:
    from tokensieve.ask import Question, answer_tokens, ask, scene_question
    from tokensieve.backbones import LlavaBackbone
    from tokensieve.data.images import load_image

    if (args.image is None) == (args.scene is None):
        raise TokensieveError("give --image FILE or --scene N (a held-out synthetic scene), one of them")
    if args.image is not None and not args.question:
        raise TokensieveError("--image needs --question")
    if args.save_scene is not None and args.scene is None:
        raise TokensieveError("--save-scene writes the image of --scene N; give --scene")
    if args.method is None and (args.keep or args.site or args.show_kept):
        raise TokensieveError("--keep, --site and --show-kept go with --method")
    if args.method is not None and args.keep is None:
        raise TokensieveError("--method needs --keep: a ratio (0.25) or a token count (25)")
    image = load_image(args.image) if args.image is not None else None
    backbone = LlavaBackbone.from_pretrained(args.model)
    if backbone.processor is None:
        raise TokensieveError(f"{args.model} has no processor files; cannot prepare the image and question")
    question = (Question(image, args.question) if image is not None
                else scene_question(backbone, args.scene, args.question, args.save_scene))
    for line in ask(question, backbone, answer_tokens(args.model, args.max_new_tokens), args.method, args.keep,
                    args.site, args.mode, args.show_kept):
        print(line)


def _list_methods(_args: argparse.Namespace) -> None:
    from tokensieve.method import Budget
    from tokensieve.methods import create_method, list_methods

    for name in list_methods():
        method = create_method(name)
        site = method.default_site
        if site == "llm":  # a schedule placed by the LLM's depth: its sites in LLaVA-1.5's 32 layers
            site = ",".join(at for at, _ in method.schedule(site, Budget(ratio=1.0), depth=32)) + " of 32"
        print(f"{name:14s} default site {site:9s} {method.paper}")


def _with_parameters(methods: list[str], settings: list[str]) -> list[str | dict]:
    """Each method name, or its config ``{"name": ..., key: value}`` where ``--param METHOD.KEY=VALUE``
    sets some of its parameters (values read as YAML: 0.5, [2, 4, 6], a path)."""
    params: dict[str, dict] = {}
    for setting in settings:
        target, sep, value = setting.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key:
            raise TokensieveError(f"--param {setting!r}: write METHOD.KEY=VALUE, e.g. pyramiddrop.layers=[2,4,6]")
        if method not in methods:
            raise TokensieveError(f"--param {setting!r}: {method!r} is not among --method {','.join(methods)}")
        try:
            params.setdefault(method, {})[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TokensieveError(f"--param {setting!r}: cannot read the value {value!r}") from None
    return [{"name": m, **params[m]} if m in params else m for m in methods]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _demo(args: argparse.Namespace) -> None:
    from tokensieve.demo import run_demo
    from tokensieve.method import Budget

    budgets = tuple(_csv(args.keep))
    if not budgets:
        raise TokensieveError("--keep needs budgets: ratios (0.33) or counts (64)")
    for keep in budgets:  # before training, which a bad budget would otherwise end after
        Budget.parse(keep)
    out = run_demo(args.out, args.set, samples=args.samples, budgets=budgets,
                   timing_samples=args.timing_samples)
    print(f"demo report: {out / 'report' / 'report.md'} (plots beside it; the trained pruner in {out / 'pruner'})")


def _train(args: argparse.Namespace) -> None:
    from tokensieve.config import load_config
    from tokensieve.train.trainer import train_two_stage
    from tokensieve.train.two_stage_config import TwoStageConfig

    cfg = load_config(TwoStageConfig, args.config, args.set)
    out = args.out or Path("runs") / args.config.stem
    train_two_stage(cfg, out, resume=args.resume)
    print(f"trained pruner written to {out} (best validation checkpoint in {out / 'best'})")


def _search(args: argparse.Namespace) -> None:
    from tokensieve.integrations.optuna_search import search_command

    search_command(args)


def _eval(args: argparse.Namespace) -> None:
    from tokensieve.backbones import LlavaBackbone
    from tokensieve.evaluate.accuracy import compare_methods
    from tokensieve.evaluate.report import timing_warning, write_report
    from tokensieve.method import Budget
    from tokensieve.methods import create_method

    methods, keeps = _csv(args.method or ""), _csv(args.keep or "")
    if args.mode == "origin" and (methods or args.pruner is not None):
        raise TokensieveError("--mode origin measures the unpruned model alone; drop --method and --pruner")
    if not methods and args.pruner is None and args.mode != "origin":
        raise TokensieveError("give --method NAMES, --pruner RUN_DIR, or both (or --mode origin)")
    if args.head_threshold is not None and (args.pruner is None or not 0 <= args.head_threshold < 1):
        raise TokensieveError(f"--head-threshold {args.head_threshold}: give it with --pruner, in [0, 1)")
    if args.head_share is not None and (args.pruner is None or not 0 < args.head_share <= 1):
        raise TokensieveError(f"--head-share {args.head_share}: give it with --pruner, in (0, 1]")
    if args.head_share is not None and args.head_threshold is not None:
        raise TokensieveError("--head-share sets how many tokens the heads keep, --head-threshold lets them decide: "
                              "give one of them")
    head_settings = {key: value for key, value in (("keep_threshold", args.head_threshold),
                                                   ("target_ratio", args.head_share)) if value is not None}
    if methods and not keeps:
        raise TokensieveError("--method needs --keep budgets: ratios (0.33) or counts (64)")
    methods = _with_parameters(methods, args.param)
    for spec in methods:
        create_method(spec)
    for keep in keeps:
        Budget.parse(keep)
    real = any(v is not None for v in (args.questions, args.images, args.answers, args.dataset, args.spec))
    if real:
        from tokensieve.evaluate.eval_data import file_data

        data = file_data(args.questions, args.images, args.answers, args.dataset, args.spec, limit=args.samples,
                         max_new_tokens=args.max_new_tokens, skip=args.skip)
    backbone = LlavaBackbone.from_pretrained(args.model)
    if backbone.processor is None:
        raise TokensieveError(f"{args.model} has no processor files; the evaluation needs one")
    if not real:
        from tokensieve.evaluate.eval_data import synthetic_data

        data = synthetic_data(backbone, args.samples or 500, args.max_new_tokens, skip=args.skip)
    pruner = None
    if args.pruner is not None:
        from tokensieve.pruner import TwoStagePruner

        pruner = TwoStagePruner.from_pretrained(args.pruner, backbone)
        pruner.cfg = replace(pruner.cfg, pruner=replace(pruner.cfg.pruner, **head_settings))
    from tokensieve.distributed import Distributed

    dist = Distributed()  # one process unless launched by torchrun / accelerate launch: then each scores a share
    log = None
    if args.out:
        from tokensieve.evaluate.sample_log import SampleLog

        fingerprint = {"model": str(args.model or "shipped testbed"), "mode": args.mode, "data": data.name,
                       "max_new_tokens": data.max_new_tokens, "site": args.site, "match": args.match,
                       "params": sorted(args.param),
                       "pruner": None if args.pruner is None else str(args.pruner),
                       **{f"pruner.{key}": value for key, value in head_settings.items()}}
        if dist.is_main:  # creates the file (or checks it) before the other processes read it
            log = SampleLog(args.out, fingerprint)
        dist.barrier()
        log = log or SampleLog(args.out, fingerprint)
    rows = compare_methods(backbone, data, methods, keeps, mode=args.mode, site=args.site,
                           batch_size=args.batch_size, progress=not args.json and dist.is_main, pruner=pruner,
                           oracle=args.oracle, log=log, timing_samples=args.timing_samples,
                           kept_examples=args.kept_examples if args.out else 0, dist=dist, match=args.match)
    if not dist.is_main:
        return
    if warning := timing_warning(rows):
        print(f"tokensieve: warning: {warning}", file=sys.stderr)
    if args.out:
        from tokensieve.evaluate.kept_overlays import example_views

        meta = {"model": str(args.model or "shipped testbed"), "mode": args.mode, "data": data.name, "match": args.match,
                "items": len(data.items), "max_new_tokens": data.max_new_tokens,
                "text_tokens_for_flops": rows[0]["tokens_per_llm_layer"][0] - backbone.n_visual_tokens,
                "command": args.command_line, "tokensieve_version": __version__,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        paths = write_report(rows, meta, args.out, example_views(backbone, data.items[:args.kept_examples]),
                             backbone.patch_grid)
        print(f"report written to {paths['report.md']}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':14s} {'site':10s} {'keep':>6s} {'tokens':>6s} {'accuracy':>8s} {'FLOPs':>6s}")
    for r in rows:
        print(f"{r['method']:14s} {str(r['site'] or '-'):10s} {str(r['keep']):>6s} "
              f"{r['visual_tokens_kept']!s:>6} {r['accuracy']:8.3f} {r['flops_ratio']:6.3f}")


def _bench_shape(args: argparse.Namespace):
    """The benchmark's model shape, once ``args.device`` is known to be able to hold it."""
    from tokensieve.devices import require_device
    from tokensieve.evaluate.speed import BenchShape

    require_device(args.device, "--device")
    if args.shape == "llava-7b" and not args.device.startswith("cuda"):
        # 7 B parameters: 28 GB in float32, more than a workstation's memory, and hours per case.
        raise TokensieveError("--shape llava-7b is a 7B model: run it on a GPU (--device cuda --dtype bfloat16), "
                              "or use --shape cpu here")
    return BenchShape.llava7b() if args.shape == "llava-7b" else BenchShape()


def _bench_speed(args: argparse.Namespace) -> None:
    import torch

    from tokensieve.evaluate.speed import (
        native_llm_reference,
        shape_summary,
        speed_benchmark,
    )
    from tokensieve.method import Budget
    from tokensieve.methods import create_method

    methods, keeps = _csv(args.method), [float(Budget.parse(k).ratio or 0) for k in _csv(args.keep)]
    for name in methods:
        create_method(name)
    if not all(keeps):
        raise TokensieveError("bench speed takes keep ratios (0.33), not token counts")
    shape = _bench_shape(args)
    dtype = getattr(torch, args.dtype)
    rows = speed_benchmark(shape, tuple(methods), tuple(keeps), repeats=args.repeats, threads=args.threads,
                           device=args.device, dtype=dtype, progress=not args.json, batch=args.batch)
    kept = sorted({r["visual_tokens_kept"] for r in rows}, reverse=True)
    native = native_llm_reference(shape, kept, repeats=args.repeats, device=args.device, dtype=dtype,
                                  batch=args.batch)
    if args.json:
        print(json.dumps({"shape": shape_summary(shape, args.device, dtype, args.batch), "rows": rows,
                          "native_llm": native}, indent=2))
        return
    print(f"{'method':10s} {'site':9s} {'keep':>5s} {'full ms':>8s} {'pruned ms':>9s} {'speedup':>7s} "
          f"{'ideal':>6s} {'scoring':>7s}")
    for r in rows:
        print(f"{r['method']:10s} {r['site']:9s} {r['keep']:5.2f} {r['prefill_ms_full']:8.1f} "
              f"{r['prefill_ms_pruned']:9.1f} {r['speedup']:7.2f} {r['ideal_speedup']:6.2f} "
              f"{r['scoring_overhead']:7.3f}  " + " ".join("ok" if ok else "MISSED" for ok in r["targets"].values()))
    print("the unpruned LLM alone on a natively shorter prompt (what perfect removal could reach here):")
    for n in native:
        print(f"  {n['visual_tokens_kept']:4d} visual tokens: {n['llm_ms_full']:8.1f} -> {n['llm_ms_short']:7.1f} ms, "
              f"speedup {n['speedup']:5.2f} of token ratio {n['token_ratio']:5.2f} ({n['share_of_token_ratio']:.3f}); "
              f"with the unpruned tower ({n['tower_ms']:.1f} ms) the most a projector-site method could reach: "
              f"{n['projector_site_bound']:.2f}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokensieve", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    testbed = sub.add_parser("testbed", help="the embedded LLaVA-architecture testbed").add_subparsers(
        dest="testbed_command", required=True)
    train = testbed.add_parser("train", help="train the testbed on the synthetic set (resumable)")
    train.add_argument("--out", required=True, type=out_folder, help="folder for the checkpoint")
    train.add_argument("--tower-steps", type=positive_int, help="stage-1 (vision tower) steps")
    train.add_argument("--llm-steps", type=positive_int, help="stage-2 (projector + LLM) steps")
    train.add_argument("--llm-layers", type=positive_int, help="decoder layers of the LLM (default 8)")
    train.add_argument("--mention-layer", type=positive_int,
                       help="LLM hidden state the question's mention words are looked up at (default 4)")
    train.add_argument("--relation-layer", type=positive_int,
                       help="LLM hidden state the spatial relation is looked up at (default 5)")
    train.add_argument("--no-resume", action="store_true", help="start over even if a saved state exists")
    train.set_defaults(func=_testbed_train)

    ev = testbed.add_parser("eval", help="accuracy and the controls that make the testbed trustworthy")
    ev.add_argument("--model", default=None, help="LLaVA checkpoint folder or hub id (default: shipped testbed)")
    ev.add_argument("--samples", type=positive_int, default=1000, help="held-out samples")
    ev.add_argument("--batch-size", type=positive_int, default=64, help="samples per forward pass (default 64)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.set_defaults(func=_testbed_eval)

    ev = sub.add_parser("eval", help="accuracy of methods at budgets, next to the unpruned model")
    ev.add_argument("--model", default=None, help="LLaVA checkpoint folder or hub id (default: shipped testbed)")
    ev.add_argument("--method", default=None, help="comma-separated method names (see `tokensieve methods`)")
    ev.add_argument("--keep", default=None, help="comma-separated budgets: ratios (0.33) or counts (64); for "
                    "--pruner, the tokens entering the LLM (default: as trained)")
    ev.add_argument("--pruner", type=Path, default=None, help="a trained two-stage pruner run folder")
    ev.add_argument("--head-threshold", type=float, default=None, metavar="T",
                    help="with --pruner: its heads keep the tokens they give a keep probability > T, a count per "
                         "row (default: the run's pruner.keep_threshold; unset, each keeps its trained share)")
    ev.add_argument("--head-share", type=float, default=None, metavar="R",
                    help="with --pruner: the share of the tokens entering the LLM its last head keeps (default: "
                         "the run's pruner.target_ratio, the share it was trained for)")
    ev.add_argument("--timing-samples", type=non_negative_int, default=8,
                    help="samples timed one at a time for TTFT and decode latency per row (0: no timing)")
    ev.add_argument("--oracle", action="store_true",
                    help="add the object oracle at each budget (synthetic set: tokens on objects only)")
    ev.add_argument("--site", default=None, help="where to reduce (default: each method's own site)")
    ev.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="set a parameter of a method in --method (repeatable), e.g. cdpruner.text_encoder=DIR "
                         "or pyramiddrop.layers=[8,16,24]; docs/methods.md lists each method's parameters")
    ev.add_argument("--match", default=None, choices=["tokens", "flops"],
                    help="give each method the budget that puts it at equal cost: the same visual tokens averaged "
                         "over the LLM's layers (tokens) or the same prefill FLOPs (flops) as each --keep value "
                         "(tokens: a count or share of the visual tokens; flops: a share of the unpruned prefill), "
                         "or with --pruner as the two-stage pruner at each budget")
    ev.add_argument("--mode", default="hard", choices=["hard", "soft", "origin"],
                    help="hard removes tokens, soft masks them as attention keys, origin runs the unpruned model only")
    ev.add_argument("--samples", type=positive_int, default=None,
                    help="items scored (default: 500 synthetic held-out samples, or every item of a real set)")
    ev.add_argument("--skip", type=non_negative_int, default=0,
                    help="items passed over before the scored ones: --skip 500 scores held-out items 500.. "
                         "(a set apart from the default 500, e.g. to choose settings on)")
    ev.add_argument("--questions", type=Path, default=None,
                    help="real VQA set, LLaVA layout: question JSONL (question_id, image, text[, category])")
    ev.add_argument("--images", type=Path, default=None, help="real VQA set: the folder the questions' images are in")
    ev.add_argument("--answers", type=Path, default=None,
                    help="real VQA set: answers JSONL (question_id, answer or answers)")
    ev.add_argument("--dataset", type=Path, default=None,
                    help="real VQA set: a Hugging Face dataset saved to disk, or parquet (with --spec)")
    ev.add_argument("--spec", type=Path, default=None,
                    help="YAML mapping image/question/answers[/question_id/family/split] to the dataset's columns")
    ev.add_argument("--max-new-tokens", type=positive_int, default=None,
                    help="answer length: 1 scores the first token (synthetic default), more generates (real: 16)")
    ev.add_argument("--batch-size", type=positive_int, default=64, help="samples per forward pass (default 64)")
    ev.add_argument("--json", action="store_true", help="print the rows as JSON")
    ev.add_argument("--kept-examples", type=non_negative_int, default=3,
                    help="with --out: samples pictured with the tokens every row kept (0: no pictures)")
    ev.add_argument("--out", type=out_folder, default=None,
                    help="folder for report.json, report.md, plots (accuracy vs tokens, tokens per layer, kept "
                         "tokens) and samples.jsonl (one line per scored item; rerun the same command to resume)")
    ev.set_defaults(func=_eval)

    demo = sub.add_parser("demo", help="train the two-stage pruner on the testbed, compare it with every method "
                                       "at 33/22/11%% in hard mode, write the report (about 4 minutes)")
    demo.add_argument("--out", type=out_folder, default=None,
                      help="folder (default: a new tokensieve-demo-<date> folder)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the packaged two_stage_testbed.yaml (repeatable)")
    demo.add_argument("--samples", type=positive_int, default=500, help="held-out samples")
    demo.add_argument("--keep", default="0.33,0.22,0.11", help="budgets (default: LLaVA's 192/128/64 of 576)")
    demo.add_argument("--timing-samples", type=non_negative_int, default=8,
                      help="samples timed one at a time for TTFT and decode latency per row (0: no timing)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train the two-stage pruner (merger + layer heads) on a frozen backbone")
    train.add_argument("config", type=Path, help="YAML config (e.g. configs/two_stage_testbed.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.steps=200 (repeatable)")
    train.add_argument("--out", type=out_folder, default=None, help="run folder (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.set_defaults(func=_train)

    search = sub.add_parser("search", help="Optuna search over the two-stage pruner's config (see docs/search.md)")
    search.add_argument("config", type=Path, help="search file: training config, space, objective, study")
    search.add_argument("--trials", type=positive_int, required=True,
                        help="run trials until the study holds this many finished (complete or pruned) ones")
    search.add_argument("--storage", default=None, help="Optuna RDB URL shared by all workers "
                        "(default: sqlite:///OUT/study.db)")
    search.add_argument("--out", type=out_folder, default=None, help="folder for trial runs and best_config.yaml "
                        "(default: runs/<search file name>)")
    search.set_defaults(func=_search)

    methods = sub.add_parser("methods", help="list the registered reduction methods")
    methods.set_defaults(func=_list_methods)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    speed = bench.add_parser("speed", help="measured prefill speedup vs the FLOPs ideal on a LLaVA-shaped model")
    speed.add_argument("--method", default="fastv,divprune", help="methods, each at its default site")
    speed.add_argument("--keep", default="0.33,0.22,0.11", help="keep ratios")
    speed.add_argument("--shape", default="cpu", choices=["cpu", "llava-7b"],
                       help="cpu: 8 layers x 512 (default); llava-7b: LLaVA-1.5-7B's shape (needs a big machine)")
    speed.add_argument("--repeats", type=positive_int, default=7, help="timed runs per case (median)")
    speed.add_argument("--batch", type=positive_int, default=1, help="prompts per prefill")
    speed.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    speed.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    speed.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="the model's dtype (default float32)")
    speed.add_argument("--json", action="store_true", help="print the rows as JSON")
    speed.set_defaults(func=_bench_speed)

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

    ask = sub.add_parser("ask", help="answer a question about an image, unpruned and with a method")
    ask.add_argument("--image", type=Path, default=None, help="an image file (or --scene)")
    ask.add_argument("--scene", type=non_negative_int, default=None, metavar="N",
                     help="held-out synthetic scene N instead of a file, with its own question and gold answer")
    ask.add_argument("--save-scene", type=Path, default=None, metavar="PNG", help="write the --scene image here")
    ask.add_argument("--question", default=None, help="the question (default with --scene: the scene's own)")
    ask.add_argument("--method", default=None, help="also answer with this method attached (see `tokensieve methods`)")
    ask.add_argument("--keep", default=None, help="the method's budget: a ratio (0.25) or a token count (25)")
    ask.add_argument("--site", default=None, help="where the method acts (default: its own site)")
    ask.add_argument("--mode", default="hard", choices=["hard", "soft"], help="remove tokens, or mask them as keys")
    ask.add_argument("--show-kept", type=Path, default=None, metavar="PNG",
                     help="with --method: draw the tokens each stage kept on the image the model saw")
    ask.add_argument("--model", default=None, help="LLaVA checkpoint folder or hub id (default: shipped testbed)")
    ask.add_argument("--max-new-tokens", type=positive_int, default=None,
                     help="answer length (default: 1 for a testbed checkpoint, whose answers are one word; "
                          "else up to 32, stopping at the end token)")
    ask.set_defaults(func=_ask)

    from tokensieve.integrations.clip_benchmark_cli import add_clip_benchmark_parser

    add_clip_benchmark_parser(sub)  # tokensieve clip-benchmark eval|compare|train-tiny|write-data|speed
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = "tokensieve " + " ".join(argv)  # recorded in reports
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; weight loading is instant
    try:
        args.func(args)
    except TokensieveError as err:
        print(f"tokensieve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C; tokensieve.interrupt.Interrupted says what was kept and where
        print(f"tokensieve: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130  # the shell's code for SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
