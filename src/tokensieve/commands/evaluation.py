"""``tokensieve eval``: the accuracy of methods and of a trained pruner at budgets, next to the
unpruned model, with the report a researcher publishes."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tokensieve.cli_args import comma_list, non_negative_int, out_folder, positive_int
from tokensieve.errors import TokensieveError
from tokensieve.version import __version__


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


def _eval(args: argparse.Namespace) -> None:
    from tokensieve.backbones.load import is_anyres, is_qwen, load_backbone
    from tokensieve.evaluate.accuracy import compare_methods
    from tokensieve.evaluate.report import timing_warning, write_report
    from tokensieve.method import Budget
    from tokensieve.methods import create_method

    methods, budgets = comma_list(args.method or ""), comma_list(args.budget or "")
    centres = comma_list(args.centres or "")
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
    if centres and args.pruner is None:
        raise TokensieveError("--centres sets the tokens the trained pruner sends into the LLM: give it with --pruner")
    if args.split != "all" and not methods:
        raise TokensieveError(f"--split {args.split} splits a --method's budget over an image's base and crops: give it "
                              "with --method (a trained pruner's merger sets its own tokens)")
    to_pruner = args.match is not None and args.pruner is not None  # methods matched to the pruner's centres
    if to_pruner and budgets:
        raise TokensieveError("--match with --pruner matches the methods to the pruner at each --centres value: "
                              "drop --budget")
    if methods and not budgets and not to_pruner:
        raise TokensieveError("--method needs --budget: ratios (0.33) or counts (64)")
    methods = _with_parameters(methods, args.param)
    for spec in methods:
        create_method(spec)
    for value in budgets + centres:
        Budget.parse(value)
    real = any(v is not None for v in (args.questions, args.images, args.answers, args.dataset, args.spec))
    if real:
        from tokensieve.evaluate.eval_data import file_data

        data = file_data(args.questions, args.images, args.answers, args.dataset, args.spec, limit=args.samples,
                         max_new_tokens=args.max_new_tokens, skip=args.skip)
    backbone = load_backbone(args.model)
    if backbone.processor is None:
        raise TokensieveError(f"{args.model} has no processor files; the evaluation needs one")
    qwen, anyres = is_qwen(backbone), is_anyres(backbone)
    if anyres and not real:
        raise TokensieveError(f"on {backbone.family_name} give a real set (--questions ... or --dataset ...): the "
                              "synthetic scenes are drawn one visual token a patch, for LLaVA-1.5 and Qwen-VL")
    if anyres and args.kept_examples:
        raise TokensieveError(f"--kept-examples on {backbone.family_name}: kept tokens are not pictured over base and "
                              "crops yet; give --kept-examples 0")
    kept_examples = args.kept_examples if args.kept_examples is not None else 0 if anyres else 3
    kept_examples = kept_examples if args.out else 0  # pictures go into the report
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
                       **({"split": args.split} if args.split != "all" else {}),
                       "params": sorted(args.param),
                       "pruner": None if args.pruner is None else str(args.pruner),
                       **{f"pruner.{key}": value for key, value in head_settings.items()}}
        if dist.is_main:  # creates the file (or checks it) before the other processes read it
            log = SampleLog(args.out, fingerprint)
        dist.barrier()
        log = log or SampleLog(args.out, fingerprint)
    rows = compare_methods(backbone, data, methods, budgets, mode=args.mode, site=args.site,
                           batch_size=args.batch_size, progress=not args.json and dist.is_main, pruner=pruner,
                           centres=centres, oracle=args.oracle, log=log, timing_samples=args.timing_samples,
                           kept_examples=kept_examples, dist=dist, match=args.match, split=args.split)
    if not dist.is_main:
        return
    if warning := timing_warning(rows):
        print(f"tokensieve: warning: {warning}", file=sys.stderr)
    if args.out:
        from tokensieve.evaluate.kept_overlays import example_views

        meta = {"model": str(args.model or "shipped testbed"), "mode": args.mode, "data": data.name, "match": args.match,
                **({"split": args.split} if args.split != "all" else {}), "items": len(data.items),
                "max_new_tokens": data.max_new_tokens,
                "text_tokens_for_flops": round(rows[0]["tokens_per_llm_layer"][0] - rows[0]["visual_tokens_mean_llm"]),
                **({"visual_tokens": "means over the items: each image gives its own count (dynamic resolution)"}
                   if qwen else {}),
                **({"visual_tokens": "means over the items: each image gives its own count (base and crops; "
                                     "newlines outside the budget, counted in tokens_per_llm_layer)"}
                   if anyres else {}),
                "command": args.command_line, "tokensieve_version": __version__,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        paths = write_report(rows, meta, args.out, example_views(backbone, data.items[:kept_examples]),
                             None if qwen or anyres else backbone.patch_grid)
        print(f"report written to {paths['report.md']}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':14s} {'site':10s} {'budget':>6s} {'tokens':>6s} {'accuracy':>8s} {'FLOPs':>6s}")
    for r in rows:
        print(f"{r['method']:14s} {str(r['site'] or '-'):10s} {str(r['budget']):>6s} "
              f"{r['visual_tokens_kept']!s:>6} {r['accuracy']:8.3f} {r['flops_ratio']:6.3f}")


def add(sub) -> None:
    """Add ``eval``."""
    ev = sub.add_parser("eval", help="accuracy of methods at budgets, next to the unpruned model")
    ev.add_argument("--model", default=None,
                    help="LLaVA, Qwen2-VL/2.5-VL/3-VL, LLaVA-NeXT(-Video) or LLaVA-OneVision checkpoint folder or hub id "
                         "(default: shipped testbed)")
    ev.add_argument("--method", default=None, help="comma-separated method names (see `tokensieve methods`)")
    ev.add_argument("--budget", default=None,
                    help="comma-separated budgets of the --method methods: ratios (0.33) or counts (64)")
    ev.add_argument("--centres", default=None,
                    help="with --pruner: comma-separated tokens it sends into the LLM (its merger's centres): "
                         "ratios of the patch tokens (0.25) or counts (24) (default: as trained)")
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
    ev.add_argument("--split", default="all", choices=["all", "even", "hired"],
                    help="how a method's budget is split over an anyres image's base and crops at llm.0 (LLaVA-NeXT "
                         "and NeXT-Video; OneVision: all and even): all: one budget over every visual token, default; "
                         "even: equal shares; hired: HiRED's rule. It applies to the --method rows only")
    ev.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="set a parameter of a method in --method (repeatable), e.g. cdpruner.text_encoder=DIR "
                         "or pyramiddrop.layers=[8,16,24]; docs/methods.md lists each method's parameters")
    ev.add_argument("--match", default=None, choices=["tokens", "flops"],
                    help="give each method the budget that puts it at equal cost: the same visual tokens averaged "
                         "over the LLM's layers (tokens) or the same prefill FLOPs (flops) as each --budget value "
                         "(tokens: a count or share of the visual tokens; flops: a share of the unpruned prefill), "
                         "or with --pruner as the two-stage pruner at each --centres value")
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
    ev.add_argument("--kept-examples", type=non_negative_int, default=None,
                    help="with --out: samples pictured with the tokens every row kept (default 3; 0: no pictures; "
                         "on Qwen-VL each image on its own grid of merged tokens; LLaVA-NeXT/OneVision: 0, not yet)")
    ev.add_argument("--out", type=out_folder, default=None,
                    help="folder for report.json, report.md, plots (accuracy vs tokens, tokens per layer, kept "
                         "tokens) and samples.jsonl (one line per scored item; rerun the same command to resume)")
    ev.set_defaults(func=_eval)
