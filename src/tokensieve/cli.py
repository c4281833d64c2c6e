"""The ``tokensieve`` command line. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys

from tokensieve.cli_args import OneLineParser
from tokensieve.commands import bench, evaluation, explore, testbed, training
from tokensieve.errors import TokensieveError

DESCRIPTION = ("Prune and merge visual tokens in LLaVA-style models and CLIP image towers, and measure "
               "accuracy and speed. Bad input ends in one line naming the problem, and exit status 2.")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="tokensieve", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    testbed.add(sub)  # testbed train|eval
    evaluation.add(sub)  # eval
    training.add(sub)  # demo, train, search
    explore.add_methods(sub)  # methods
    bench.add(sub)  # bench speed|train
    explore.add_ask(sub)  # ask
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
    except BrokenPipeError:  # the reader stopped early (tokensieve methods | head): nothing is lost
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 0
    except KeyboardInterrupt as err:  # Ctrl-C; tokensieve.interrupt.Interrupted says what was kept and where
        print(f"tokensieve: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130  # the shell's code for SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
