"""``tokensieve testbed train|eval``: train the embedded LLaVA-architecture testbed (or, with
``--backbone qwen``, the Qwen2.5-VL one), and check it."""

from __future__ import annotations

import argparse
import json

from tokensieve.cli_args import out_folder, positive_int
from tokensieve.errors import TokensieveError


def _testbed_train(args: argparse.Namespace) -> None:
    from tokensieve.testbed.model import TestbedSize
    from tokensieve.testbed.train import TestbedTrainConfig, train_testbed

    keys = ("tower_steps", "tower_batch", "llm_steps", "mention_layer", "relation_layer", "position_layer")
    given = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.llm_layers is not None:
        given["size"] = TestbedSize(text_layers=args.llm_layers)
    cfg = TestbedTrainConfig(**given, backbone=args.backbone)
    out = train_testbed(args.out, cfg, resume=not args.no_resume)
    print(f"testbed checkpoint written to {out}")


def _testbed_eval(args: argparse.Namespace) -> None:
    from tokensieve.backbones import LlavaBackbone
    from tokensieve.backbones.hf_qwen import QwenVLBackbone
    from tokensieve.testbed.evaluate import evaluate_testbed

    backbone = (QwenVLBackbone if args.backbone == "qwen" else LlavaBackbone).from_pretrained(args.model)
    if backbone.processor is None:
        raise TokensieveError(f"{args.model} has no processor files; the testbed evaluation needs one")
    report = evaluate_testbed(backbone, n_samples=args.samples, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key not in ("per_family", "targets", "visual_tokens_per_size"):
            print(f"{key:28s} {value}")
    print("per family: " + ", ".join(f"{k} {v:.3f}" for k, v in report["per_family"].items()))
    if "visual_tokens_per_size" in report:
        print("visual tokens per image size: " + ", ".join(f"{k} {v}" for k, v in report["visual_tokens_per_size"].items()))
    for name, ok in report["targets"].items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")


def add(sub) -> None:
    """Add ``testbed train`` and ``testbed eval``."""

    testbed = sub.add_parser("testbed", help="the embedded LLaVA-architecture testbed").add_subparsers(
        dest="testbed_command", required=True)
    train = testbed.add_parser("train", help="train the testbed on the synthetic set (resumable)")
    train.add_argument("--out", required=True, type=out_folder, help="folder for the checkpoint")
    train.add_argument("--backbone", choices=("llava", "qwen"), default="llava",
                       help="the architecture: LLaVA-1.5 (default) or Qwen2.5-VL (images of four sizes)")
    train.add_argument("--tower-steps", type=positive_int, help="stage-1 (vision tower) steps")
    train.add_argument("--tower-batch", type=positive_int, help="stage-1 images per step (default 64)")
    train.add_argument("--llm-steps", type=positive_int, help="stage-2 (projector + LLM) steps")
    train.add_argument("--llm-layers", type=positive_int, help="decoder layers of the LLM (default 8)")
    train.add_argument("--mention-layer", type=positive_int,
                       help="LLM hidden state the question's mention words are looked up at (default 4)")
    train.add_argument("--relation-layer", type=positive_int,
                       help="LLM hidden state the spatial relation is looked up at (default 5)")
    train.add_argument("--position-layer", type=positive_int,
                       help="LLM hidden state at which each visual token learns its own row and column "
                            "(default: none; the Qwen testbed is trained with 2)")
    train.add_argument("--no-resume", action="store_true", help="start over even if a saved state exists")
    train.set_defaults(func=_testbed_train)

    ev = testbed.add_parser("eval", help="accuracy and the controls that make the testbed trustworthy")
    ev.add_argument("--backbone", choices=("llava", "qwen"), default="llava",
                    help="the checkpoint's architecture (qwen: a Qwen2.5-VL testbed, the shipped one by default)")
    ev.add_argument("--model", default=None,
                    help="checkpoint folder or hub id (default: the shipped testbed of --backbone)")
    ev.add_argument("--samples", type=positive_int, default=1000, help="held-out samples")
    ev.add_argument("--batch-size", type=positive_int, default=64, help="samples per forward pass (default 64)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.set_defaults(func=_testbed_eval)
