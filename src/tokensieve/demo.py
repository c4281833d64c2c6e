"""``tokensieve demo``: the whole story on the embedded testbed, in one command.

Train the two-stage pruner briefly, then measure it, every training-free method and the
object oracle at three budgets in ``hard`` mode next to the unpruned model, and write the
report with its plots. The pruner's centres are the methods' budgets: at each value it sends
as many tokens into the LLM as each method keeps at its site. About 5 minutes on 2 CPU cores.
With ``backbone="qwen"`` the same on the shipped Qwen2.5-VL testbed (or one given as ``model``), from
``configs/two_stage_qwen_testbed.yaml``: budgets are shares of each image's tokens.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from tokensieve.attach import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.backbones.shipped import shipped_testbed
from tokensieve.config import load_config
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.accuracy import compare_methods
from tokensieve.evaluate.eval_data import synthetic_data
from tokensieve.evaluate.kept_overlays import example_views
from tokensieve.evaluate.report import timing_warning, write_report
from tokensieve.evaluate.sample_log import SampleLog
from tokensieve.interrupt import Interrupted
from tokensieve.methods import list_methods, method_class, method_label
from tokensieve.pruner import TwoStagePruner
from tokensieve.train.trainer import train_two_stage
from tokensieve.train.two_stage_config import TwoStageConfig
from tokensieve.version import __version__

DEMO_CONFIG = "two_stage_testbed.yaml"
QWEN_DEMO_CONFIG = "two_stage_qwen_testbed.yaml"
BUDGETS = ("0.33", "0.22", "0.11")  # LLaVA's 192, 128 and 64 of 576 tokens


def default_folder() -> Path:
    return Path(f"tokensieve-demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def demo_config(overrides: list[str] = (), name: str = DEMO_CONFIG) -> TwoStageConfig:
    """The packaged ``configs/<name>`` (default ``two_stage_testbed.yaml``) with ``overrides``."""
    with resources.as_file(resources.files("tokensieve") / "configs" / name) as path:
        return load_config(TwoStageConfig, path, overrides)


def variants(name: str) -> list[str | dict]:
    """A method's default, then the variants the library offers where the default cannot run
    (docs/models.md): its variant without CLS (``no_cls_options``: the authors' Qwen2.5-VL port of
    VisionZip, ours for the others) and, for a method that renumbers positions, kept tokens keeping
    theirs (``positions="original"``, ours)."""
    method = method_class(name)
    found: list[str | dict] = [name]
    if getattr(method, "no_cls_options", None):
        found.append({"name": name, **method.no_cls_options})
    if "positions" in {f.name for f in fields(method)}:
        found.append({"name": name, "positions": "original"})
    return found


def runnable_pairs(backbone: LlavaBackbone | QwenVLBackbone, budgets: tuple[str, ...]
                   ) -> tuple[list[tuple[str | dict, str]], list[str]]:
    """``(pairs, left_out)``: every training-free method at every budget it can run at on ``backbone``,
    with its defaults or else the first of its :func:`variants` that runs, and a line for each one that
    cannot (CDPruner needs a CLIP text encoder the testbed lacks; ToMe's blocks cannot halve 100 tokens
    below 13)."""
    pairs, left_out = [], []
    for name in (name for name in list_methods() if not method_class(name).trained):
        for budget in budgets:
            refusals = []
            for method in variants(name):
                try:
                    attach(backbone, method, budget).detach()
                except TokensieveError as err:
                    refusals.append(f"{'' if isinstance(method, str) else f'as {method_label(method)}: '}{err}")
                    continue
                pairs.append((method, budget))
                break
            else:
                left_out.append(f"{name} at {budget}: " + "; ".join(refusals))
    return pairs, left_out


def run_demo(out: str | Path | None = None, overrides: list[str] = (), samples: int = 500,
             budgets: tuple[str, ...] = BUDGETS, timing_samples: int = 8, kept_examples: int = 3,
             progress: bool = True, testbed: str = "llava") -> Path:
    """Train, evaluate and report into ``out`` (default: a new dated folder); returns ``out``.

    ``out/pruner`` holds the training run, ``out/report`` the report (resumable: rerun the same
    command after an interruption and finished work is kept).
    budgets: the methods' budgets, and the same values as the pruner's centres.
    testbed: ``"llava"`` (the shipped testbed unless ``model=`` is overridden) or ``"qwen"``
    (``configs/two_stage_qwen_testbed.yaml``; the shipped Qwen testbed unless ``model=`` is overridden).
    """
    if out is None:
        out = default_folder()
        try:
            return run_demo(out, overrides, samples, budgets, timing_samples, kept_examples, progress, testbed)
        except Interrupted as err:  # "the same command" would start another dated folder
            raise Interrupted(err.saved, f"rerun it with --out {out} to continue") from None
    out = Path(out)
    qwen = testbed == "qwen"
    cfg = demo_config(overrides, QWEN_DEMO_CONFIG if qwen else DEMO_CONFIG)
    if qwen and cfg.model is None:  # the shipped Qwen testbed; the trainer's default is the LLaVA one
        cfg.model = str(shipped_testbed("qwen"))
    run = out / "pruner"
    train_two_stage(cfg, run, resume=True, progress=progress)
    backbone = (QwenVLBackbone if qwen else LlavaBackbone).from_pretrained(cfg.model)
    pairs, left_out = runnable_pairs(backbone, budgets)
    for line in left_out:
        print(f"tokensieve demo: left out {line}", file=sys.stderr)
    data = synthetic_data(backbone, samples)
    log = SampleLog(out / "report", {"model": str(cfg.model or "shipped testbed"), "mode": "hard",
                                     "data": data.name, "max_new_tokens": data.max_new_tokens, "site": None,
                                     "pruner": str(run)})
    rows = compare_methods(backbone, data, [], list(budgets), mode="hard", progress=progress, pairs=pairs,
                           pruner=TwoStagePruner.from_pretrained(run, backbone), centres=list(budgets), oracle=True,
                           log=log, timing_samples=timing_samples, kept_examples=kept_examples)
    meta = {"model": str(cfg.model or "shipped testbed"), "mode": "hard", "data": data.name,
            "text_tokens_for_flops": round(rows[0]["tokens_per_llm_layer"][0] - rows[0]["visual_tokens_kept"]),
            **({"visual_tokens": "means over the items: each image gives its own count (dynamic resolution)"}
               if qwen else {}),
            "pruner": str(run), "left out": "; ".join(left_out) or "none", "command": "tokensieve demo",
            "tokensieve_version": __version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_report(rows, meta, out / "report", example_views(backbone, data.items[:kept_examples]),
                 None if qwen else backbone.patch_grid)  # Qwen-VL: each image pictured on its own grid
    if warning := timing_warning(rows):
        print(f"tokensieve: warning: {warning}", file=sys.stderr)
    return out
