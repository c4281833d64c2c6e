"""``tokensieve demo|train|search``: train the two-stage pruner (alone, in the demo, or in an
Optuna search)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.cli_args import comma_list, non_negative_int, out_folder, positive_int
from tokensieve.errors import TokensieveError


def _demo(args: argparse.Namespace) -> None:
    from tokensieve.demo import run_demo
    from tokensieve.method import Budget

    budgets = tuple(comma_list(args.budget))
    if not budgets:
        raise TokensieveError("--budget needs ratios (0.33) or counts (64)")
    for budget in budgets:  # before training, which a bad budget would otherwise end after
        Budget.parse(budget)
    overrides = [*args.set, *([f"model={args.model}"] if args.model is not None else [])]
    out = run_demo(args.out, overrides, samples=args.samples, budgets=budgets,
                   timing_samples=args.timing_samples, testbed=args.backbone)
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


def add(sub) -> None:
    """Add ``demo``, ``train`` and ``search``."""
    demo = sub.add_parser("demo", help="train the two-stage pruner on the testbed, compare it with every method "
                                       "at 33/22/11%% in hard mode, write the report (about 4 minutes)")
    demo.add_argument("--out", type=out_folder, default=None,
                      help="folder (default: a new tokensieve-demo-<date> folder)")
    demo.add_argument("--backbone", choices=("llava", "qwen"), default="llava",
                      help="the shipped testbed: LLaVA-1.5 (default) or Qwen2.5-VL ("
                           "configs/two_stage_qwen_testbed.yaml)")
    demo.add_argument("--model", default=None,
                      help="the testbed's checkpoint folder (default: --backbone's shipped one; as --set model=DIR)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the packaged two_stage_testbed.yaml (two_stage_qwen_testbed.yaml "
                           "with --backbone qwen) (repeatable)")
    demo.add_argument("--samples", type=positive_int, default=500, help="held-out samples")
    demo.add_argument("--budget", default="0.33,0.22,0.11",
                      help="budgets of the methods and, as its centres, of the trained pruner: it sends as many "
                           "tokens into the LLM as each method keeps (default: LLaVA's 192/128/64 of 576)")
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
