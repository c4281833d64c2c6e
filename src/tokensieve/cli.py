"""The ``tokensieve`` command line. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokensieve.errors import TokensieveError


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _testbed_train(args: argparse.Namespace) -> None:
    from tokensieve.testbed.train import TestbedTrainConfig, train_testbed

    cfg = TestbedTrainConfig()
    if args.tower_steps is not None:
        cfg.tower_steps = args.tower_steps
    if args.llm_steps is not None:
        cfg.llm_steps = args.llm_steps
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
    from tokensieve.backbones import LlavaBackbone
    from tokensieve.data.images import load_image
    from tokensieve.testbed.processor import prompt

    image = load_image(args.image)
    backbone = LlavaBackbone.from_pretrained(args.model)
    if backbone.processor is None:
        raise TokensieveError(f"{args.model} has no processor files; cannot prepare the image and question")
    batch = backbone.processor(images=[image], text=[prompt(args.question)], return_tensors="pt")
    new = backbone.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(backbone.processor.tokenizer.decode(new[0], skip_special_tokens=True).strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    testbed = sub.add_parser("testbed", help="the embedded LLaVA-architecture testbed").add_subparsers(
        dest="testbed_command", required=True)
    train = testbed.add_parser("train", help="train the testbed on the synthetic set (resumable)")
    train.add_argument("--out", required=True, type=Path, help="folder for the checkpoint")
    train.add_argument("--tower-steps", type=_positive_int, help="stage-1 (vision tower) steps")
    train.add_argument("--llm-steps", type=_positive_int, help="stage-2 (projector + LLM) steps")
    train.add_argument("--no-resume", action="store_true", help="start over even if a saved state exists")
    train.set_defaults(func=_testbed_train)

    ev = testbed.add_parser("eval", help="accuracy and the controls that make the testbed trustworthy")
    ev.add_argument("--model", default=None, help="LLaVA checkpoint folder or hub id (default: shipped testbed)")
    ev.add_argument("--samples", type=_positive_int, default=1000, help="held-out samples")
    ev.add_argument("--batch-size", type=_positive_int, default=64)
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.set_defaults(func=_testbed_eval)

    ask = sub.add_parser("ask", help="answer a question about an image file")
    ask.add_argument("--image", required=True, type=Path)
    ask.add_argument("--question", required=True)
    ask.add_argument("--model", default=None, help="LLaVA checkpoint folder or hub id (default: shipped testbed)")
    ask.add_argument("--max-new-tokens", type=_positive_int, default=4)
    ask.set_defaults(func=_ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TokensieveError as err:
        print(f"tokensieve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
