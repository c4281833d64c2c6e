"""``tokensieve clip-benchmark ...``: eval, compare, train-tiny, write-data, speed.

``eval`` and ``compare`` take every ``clip_benchmark eval`` argument; the pruning flags below are
taken out first and the rest goes to clip_benchmark's own parser unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tokensieve.cli_args import OneLineParser, out_folder, positive_int
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.clip_pruning import VIT_METHODS, PruningSettings
from tokensieve.integrations.clip_benchmark import run_clip_benchmark, write_json


def _layers(text: str) -> list[int]:
    """``"1"``, ``"1,4,8"`` or ``"1-11"`` -> block indices."""
    out: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"cannot read blocks {text!r}; write 1 or 1,4,8 or 1-11")
        first, last = int(match[1]), int(match[2] or match[1])
        out.extend(range(first, last + 1))
    return out


def pruning_parser(prog: str, compare: bool = False) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, add_help=False, allow_abbrev=False,
                                     description="Every other argument is a clip_benchmark eval argument.")
    parser.add_argument("-h", "--help", action="store_true", help="this help, then clip_benchmark eval's")
    if not compare:
        parser.add_argument("--enable_pruning", action="store_true", help="prune image tokens (default: off)")
    parser.add_argument("--k_anchors", type=int, default=10, help="anchors chosen by CLS attention (default 10)")
    parser.add_argument("--top_m", type=int, default=50, help="tokens kept besides CLS and anchors (default 50)")
    parser.add_argument("--alpha", type=float, default=0.5, help="importance weight in [0, 1] (default 0.5)")
    parser.add_argument("--prune_layers", type=_layers, default=None,
                        help="blocks to prune before: 1, 1,4,8 or 1-11 (default: every block from 1)")
    parser.add_argument("--prune_method", default="anchor", choices=VIT_METHODS,
                        help="anchor (default) or another method at the same budget of k_anchors + top_m tokens")
    parser.add_argument("--extract_attention", action="store_true",
                        help="save every block's CLS attention and the kept indices, per image")
    parser.add_argument("--attention_output", default=None, metavar="FILE",
                        help="where (default: the result file's name + _attention.pt); may use clip_benchmark's "
                             "{dataset} {model} {pretrained} {language} {task} fields")
    if compare:
        parser.add_argument("--latency_batch", type=positive_int, default=16, help="images per timed encoder pass")
        parser.add_argument("--latency_repeats", type=positive_int, default=5, help="timed passes of each (median)")
    return parser


def _split(prog: str, argv: list[str], compare: bool = False) -> tuple[argparse.Namespace, list[str]]:
    parser = pruning_parser(prog, compare)
    ours, rest = parser.parse_known_args(argv)
    if ours.help:
        parser.print_help()
        print("\nclip_benchmark eval arguments:")
        run_clip_benchmark(["-h"], PruningSettings())  # clip_benchmark prints its help and exits
    return ours, rest


def _settings(ours: argparse.Namespace, enable: bool) -> PruningSettings:
    settings = PruningSettings(enable_pruning=enable, prune_method=ours.prune_method, k_anchors=ours.k_anchors,
                               top_m=ours.top_m, alpha=ours.alpha, prune_layers=ours.prune_layers,
                               extract_attention=ours.extract_attention, attention_output=ours.attention_output)
    settings.validate()
    return settings


def _eval(args: argparse.Namespace) -> None:
    ours, rest = _split("tokensieve clip-benchmark eval", args.args)
    session = run_clip_benchmark(rest, _settings(ours, ours.enable_pruning))
    for run in session.runs:
        if run.output is not None:
            print(f"tokensieve: result with the pruning record in {run.output}")


def _with_suffix(rest: list[str], suffix: str) -> list[str]:
    """``rest`` with its ``--output`` template (or clip_benchmark's default) ending in ``suffix``."""
    template, out, skip = "{dataset}_{pretrained}_{model}_{language}_{task}.json", [], False
    for i, arg in enumerate(rest):
        if skip:
            skip = False
        elif arg == "--output" and i + 1 < len(rest):
            template, skip = rest[i + 1], True
        elif arg.startswith("--output="):
            template = arg.split("=", 1)[1]
        else:
            out.append(arg)
    stem, dot, ext = template.rpartition(".") if template.endswith(".json") else (template, "", "")
    return [*out, "--output", f"{stem}{suffix}{dot}{ext}"]


def _main_metrics(metrics: dict) -> dict:
    keys = [k for k in ("acc1", "acc5", "mean_per_class_recall") if k in metrics] or sorted(metrics)
    return {k: metrics[k] for k in keys}


def _compare(args: argparse.Namespace) -> None:
    import torch

    from tokensieve.evaluate.clip_speed import speed_row

    ours, rest = _split("tokensieve clip-benchmark compare", args.args, compare=True)
    settings = _settings(ours, True)
    baseline = run_clip_benchmark(_with_suffix(rest, "_baseline"), PruningSettings())
    pruned = run_clip_benchmark(_with_suffix(rest, "_pruned"), settings, keep_models=True)
    done_runs = [(b, p) for b, p in zip(baseline.runs, pruned.runs) if b.output and p.output]
    if not done_runs:
        raise TokensieveError("nothing was evaluated (every result file existed already with --skip_existing?)")
    rows = []
    for base_run, run in done_runs:
        try:
            device = next(run.model.parameters()).device
            size = run.backbone.image_size
            pixels = torch.randn(ours.latency_batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            tokens = json.loads(run.output.read_text())["tokensieve"]["image_tokens_per_block"]
            speed = speed_row(run.backbone, run.handle, pixels, tokens, ours.latency_repeats)
        finally:
            pruned.release(run)
        result = json.loads(run.output.read_text())
        result["tokensieve"]["latency"] = speed
        write_json(run.output, result)
        base = json.loads(base_run.output.read_text())
        for label, res, ms, up in (("baseline", base, speed["latency_ms_full"], 1.0),
                                   (settings.prune_method, result, speed["latency_ms_pruned"], speed["speedup"])):
            rows.append({"dataset": res["dataset"], "model": res["model"], "run": label,
                         "metrics": _main_metrics(res["metrics"]), "tokens_per_block": res["tokensieve"]
                         ["image_tokens_per_block"], "latency_ms": ms, "speedup": up,
                         "ideal_speedup": speed["ideal_speedup"] if label != "baseline" else 1.0,
                         "result_file": str(base_run.output if label == "baseline" else run.output)})
    _print_table(rows, ours.latency_batch)


def _print_table(rows: list[dict], batch: int) -> None:
    names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    head = f"{'dataset':28s} {'model':22s} {'run':10s} " + " ".join(f"{n[:22]:>22s}" for n in names)
    print(head + f" {'tokens':>14s} {'ms/batch':>9s} {'speedup':>7s} {'ideal':>6s}")
    for r in rows:
        t = r["tokens_per_block"]
        tokens = f"{t[0]}->{t[-1]} ({(t[-1] - 1) / (t[0] - 1):.0%})"
        print(f"{r['dataset'][:28]:28s} {r['model'][:22]:22s} {r['run']:10s} "
              + " ".join(f"{r['metrics'].get(n, float('nan')):22.4f}" for n in names)
              + f" {tokens:>14s} {r['latency_ms']:9.1f} {r['speedup']:7.2f} {r['ideal_speedup']:6.2f}")
    print(f"(latency: median image-encoder time for a batch of {batch}, pruned and unpruned alternately; "
          "ideal: linear-FLOPs ratio of the image encoder)")


def _train_tiny(args: argparse.Namespace) -> None:
    from tokensieve.clip.train import TinyTrainConfig, train_tiny_clip

    cfg = TinyTrainConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    weights = train_tiny_clip(args.out, cfg, resume=not args.no_resume)
    print(f"tiny CLIP written to {weights} (use: --model tokensieve-tiny-clip --pretrained {weights})")


def _export_tiny(args: argparse.Namespace) -> None:
    from tokensieve.clip.export import export_local_dir

    out = export_local_dir(args.out, args.pretrained)
    print(f"open_clip folder written to {out} (use: --model local-dir:{out}, with clip_benchmark or open_clip)")


def _write_data(args: argparse.Namespace) -> None:
    from tokensieve.clip.wds import write_shape_datasets

    roots = write_shape_datasets(args.out, args.classification_images, args.retrieval_images)
    for name, root in roots.items():
        print(f"{name:28s} {root}")
    print(f"use: --dataset wds/shapes_classification --dataset_root '{args.out}/{{dataset}}'")


def _speed(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from tokensieve.evaluate.clip_speed import SHAPES, TARGET, speed_rows

    base = PruningSettings(enable_pruning=True, k_anchors=args.k_anchors, top_m=args.top_m,
                           prune_layers=args.prune_layers or [1])
    variants = [replace(base, prune_method=m.strip()) for m in args.methods.split(",")]
    for settings in variants:
        settings.validate()
    report = speed_rows(SHAPES[args.shape], variants, batch=args.batch, repeats=args.repeats, threads=args.threads)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.shape} ({report['shape']['image_size']}px, {report['threads']} threads), batch {args.batch}")
    print(f"{'method':14s} {'tokens':>10s} {'full ms':>8s} {'pruned ms':>9s} {'speedup':>7s} {'ideal':>6s} "
          f"{'ratio':>6s} {'fastest':>7s} {'scoring':>7s}")
    for r in report["rows"]:
        t = r["tokens_per_block"]
        print(f"{r['method']['name']:14s} {f'{t[0]}->{t[-1]}':>10s} {r['latency_ms_full']:8.1f} "
              f"{r['latency_ms_pruned']:9.1f} {r['speedup']:7.2f} {r['ideal_speedup']:6.2f} "
              f"{r['speedup_over_ideal']:6.2f} {r['speedup_of_fastest']:7.2f} {r['scoring_overhead']:7.3f}  "
              f"{'ok' if r['speedup_over_ideal'] >= TARGET else 'MISSED'}")


def add_clip_benchmark_parser(sub) -> None:
    """Register ``tokensieve clip-benchmark ...`` on the main parser's subcommands."""
    clip = sub.add_parser("clip-benchmark", help="token pruning inside CLIP image towers, evaluated by "
                                                 "clip_benchmark").add_subparsers(dest="clip_command", required=True)
    passthrough = (("eval", _eval, ("clip_benchmark eval with pruning flags (every clip_benchmark eval argument "
                                    "works; -h lists both)")),
                   ("compare", _compare, ("baseline and pruned in one go, with measured image-encoder latency; "
                                          "prints a table")))
    for name, func, text in passthrough:
        p = clip.add_parser(name, help=text, prefix_chars="\0", add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER, help="pruning flags and clip_benchmark eval arguments")
        p.set_defaults(func=func)

    train = clip.add_parser("train-tiny", help="train the tiny open_clip model on synthetic shapes (resumable)")
    train.add_argument("--out", required=True, type=out_folder, help="folder for the checkpoint")
    train.add_argument("--steps", type=positive_int, default=None, help="training steps (default 200)")
    train.add_argument("--no-resume", action="store_true", help="start over even if a saved state exists")
    train.set_defaults(func=_train_tiny)

    export = clip.add_parser("export-tiny", help="the tiny CLIP as an open_clip local-dir: folder, loadable by the "
                                                 "clip_benchmark console script and open_clip itself")
    export.add_argument("--out", required=True, type=out_folder, help="folder to write")
    export.add_argument("--pretrained", type=Path, default=None,
                        help="a tiny CLIP checkpoint from train-tiny (default: the shipped one)")
    export.set_defaults(func=_export_tiny)

    data = clip.add_parser("write-data", help="write the synthetic shape sets in clip_benchmark's wds layout")
    data.add_argument("--out", required=True, type=out_folder, help="folder the two sets are written into")
    data.add_argument("--classification-images", type=positive_int, default=540,
                      help="images of the zero-shot classification set (default 540)")
    data.add_argument("--retrieval-images", type=positive_int, default=300,
                      help="image-caption pairs of the retrieval set (default 300)")
    data.set_defaults(func=_write_data)

    speed = clip.add_parser("speed", help="measured image-encoder speedup vs the linear-FLOPs ideal on a random "
                                          "ViT-B-shaped tower")
    speed.add_argument("--shape", default="vit-b-16", choices=["vit-b-16", "vit-b-32"],
                       help="the random tower's shape: ViT-B/16 (196 patches, default) or ViT-B/32 (49)")
    speed.add_argument("--methods", default="anchor", help="comma-separated methods")
    speed.add_argument("--k_anchors", type=int, default=10, help="anchors chosen by CLS attention (default 10)")
    speed.add_argument("--top_m", type=int, default=50, help="tokens kept besides CLS and anchors (default 50)")
    speed.add_argument("--prune_layers", type=_layers, default=None, help="blocks to prune before (default 1)")
    speed.add_argument("--batch", type=positive_int, default=8, help="images per timed pass (default 8)")
    speed.add_argument("--repeats", type=positive_int, default=5, help="timed passes per case (median, default 5)")
    speed.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    speed.add_argument("--json", action="store_true", help="print the report as JSON")
    speed.set_defaults(func=_speed)
