"""``tokensieve methods|ask``: the registered methods, and one question answered unpruned and
with a method."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.cli_args import non_negative_int, positive_int
from tokensieve.errors import TokensieveError


def _list_methods(_args: argparse.Namespace) -> None:
    from tokensieve.method import Budget
    from tokensieve.methods import create_method, list_methods

    for name in list_methods():
        method = create_method(name)
        site = method.default_site
        if site == "llm":  # a schedule placed by the LLM's depth: its sites in LLaVA-1.5's 32 layers
            site = ",".join(at for at, _ in method.schedule(site, Budget(ratio=1.0), depth=32)) + " of 32"
        print(f"{name:14s} default site {site:9s} {method.paper}")


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
    if args.method is None and (args.budget or args.site or args.show_kept):
        raise TokensieveError("--budget, --site and --show-kept go with --method")
    if args.method is not None and args.budget is None:
        raise TokensieveError("--method needs --budget: a ratio (0.25) or a token count (25)")
    image = load_image(args.image) if args.image is not None else None
    backbone = LlavaBackbone.from_pretrained(args.model)
    if backbone.processor is None:
        raise TokensieveError(f"{args.model} has no processor files; cannot prepare the image and question")
    question = (Question(image, args.question) if image is not None
                else scene_question(backbone, args.scene, args.question, args.save_scene))
    for line in ask(question, backbone, answer_tokens(args.model, args.max_new_tokens), args.method, args.budget,
                    args.site, args.mode, args.show_kept):
        print(line)


def add_methods(sub) -> None:
    """Add ``methods``."""
    methods = sub.add_parser("methods", help="list the registered reduction methods")
    methods.set_defaults(func=_list_methods)


def add_ask(sub) -> None:
    """Add ``ask``."""
    ask = sub.add_parser("ask", help="answer a question about an image, unpruned and with a method")
    ask.add_argument("--image", type=Path, default=None, help="an image file (or --scene)")
    ask.add_argument("--scene", type=non_negative_int, default=None, metavar="N",
                     help="held-out synthetic scene N instead of a file, with its own question and gold answer")
    ask.add_argument("--save-scene", type=Path, default=None, metavar="PNG", help="write the --scene image here")
    ask.add_argument("--question", default=None, help="the question (default with --scene: the scene's own)")
    ask.add_argument("--method", default=None, help="also answer with this method attached (see `tokensieve methods`)")
    ask.add_argument("--budget", default=None, help="the method's budget: a ratio (0.25) or a token count (25)")
    ask.add_argument("--site", default=None, help="where the method acts (default: its own site)")
    ask.add_argument("--mode", default="hard", choices=["hard", "soft"], help="remove tokens, or mask them as keys")
    ask.add_argument("--show-kept", type=Path, default=None, metavar="PNG",
                     help="with --method: draw the tokens each stage kept on the image the model saw")
    ask.add_argument("--model", default=None, help="LLaVA checkpoint folder or hub id (default: shipped testbed)")
    ask.add_argument("--max-new-tokens", type=positive_int, default=None,
                     help="answer length (default: 1 for a testbed checkpoint, whose answers are one word; "
                          "else up to 32, stopping at the end token)")
    ask.set_defaults(func=_ask)
