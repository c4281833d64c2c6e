"""Every command block in README.md and docs/*.md runs as written (tests/doc_commands.py says how).

One test per documentation file: its blocks run in order in one scratch folder, so a command
may use what an earlier one wrote (a run folder, a data set), as a reader following the page would.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from doc_commands import DOC_FILES, ROOT, Block, apply, blocks, commands, recipe_for
from tokensieve.cli import build_parser, main

BIN = Path(sys.executable).parent


def _tokensieve_argv(argv: list[str]) -> list[str] | None:
    """The tokensieve arguments of a command: ``tokensieve ...`` or ``... -m tokensieve ...``."""
    if Path(argv[0]).name == "tokensieve":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1] == "tokensieve":
        return argv[argv.index("-m") + 2:]
    return None


def _check_lmms_eval_model_args(model_args: str) -> None:
    from tokensieve.integrations.lmms_eval_model import TokensieveModel

    known = set(inspect.signature(TokensieveModel.__init__).parameters) - {"self", "unknown"}
    given = {pair.split("=", 1)[0] for pair in model_args.split(",") if pair}
    assert given <= known, f"unknown tokensieve model_args {sorted(given - known)}"


def _parse_only(argv: list[str]) -> None:
    """The arguments of a command this machine cannot run, through tokensieve's own checks."""
    if argv[:3] == ["pip", "install", "-e"]:
        extra = argv[3].split("[", 1)[1].rstrip("]")
        assert extra in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        return
    if "--model" in argv and argv[argv.index("--model") + 1] == "tokensieve":  # lmms-eval
        _check_lmms_eval_model_args(argv[argv.index("--model_args") + 1])
        return
    ours = _tokensieve_argv(argv)
    assert ours is not None, f"no way to check {argv}"
    args = build_parser().parse_args(ours)
    if ours[0] == "train":
        from tokensieve.config import load_config
        from tokensieve.train.two_stage_config import TwoStageConfig

        load_config(TwoStageConfig, ROOT / args.config, args.set)
    if ours[0] == "clip-benchmark" and ours[1] == "eval":
        from clip_benchmark import cli

        from tokensieve.integrations.clip_benchmark_cli import pruning_parser

        _, rest = pruning_parser("eval").parse_known_args(args.args)
        saved, sys.argv = sys.argv, ["clip_benchmark", "eval", *rest]
        try:
            cli.get_parser_args()
        finally:
            sys.argv = saved


def _run(argv: list[str]) -> None:
    ours = _tokensieve_argv(argv)
    if ours is not None and argv[0] != "torchrun":
        assert main(ours) == 0, f"tokensieve {' '.join(ours)} failed"
        return
    if argv[0] == "torchrun":
        argv = [str(BIN / "torchrun"), *argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-c", " ".join(argv)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _small_search_file(folder: Path) -> Path:
    """configs/search_testbed.yaml with trials of two steps (its own fixed keys would train 200), under
    the same file name, so its default run folder is the one the page names."""
    search = yaml.safe_load((ROOT / "configs" / "search_testbed.yaml").read_text())
    search["train"] = str(ROOT / "configs" / search["train"])
    search["set"].update({"optim.steps": 2, "optim.batch_size": 4, "validation.every": 2, "validation.samples": 4})
    (folder / "small").mkdir()
    path = folder / "small" / "search_testbed.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def _synopsis_options_exist(block: Block) -> None:
    """Each ``--option`` of a ``tokensieve ...`` usage line is an option of that subcommand."""
    parser = build_parser()
    for line in block.text.splitlines():
        words = line.split("#")[0].split()
        if not words or words[0] != "tokensieve":
            continue
        sub = parser
        for word in words[1:]:
            choices = next((a.choices for a in sub._actions if a.choices and isinstance(a.choices, dict)), None)
            if choices is None or word not in choices:
                break
            sub = choices[word]
        known = {opt for action in sub._actions for opt in action.option_strings}
        for word in words:
            option = word.strip("[]|").split("=")[0]
            if option.startswith("--"):
                assert option in known, f"{block.where}: {' '.join(words[:3])} has no option {option}"


def _blocks_with_commands(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in ("bash", "python") or
            (b.lang == "text" and any(line.startswith("tokensieve ") for line in b.text.splitlines()))]


def test_every_documented_command_has_a_recipe():
    missing = [f"{b.where}: {' '.join(argv)}" for path in DOC_FILES for b in blocks(path) if b.lang == "bash"
               for argv in commands(b) if recipe_for(argv) is None]
    assert not missing, "documented commands the doc tests cannot run (add a recipe):\n" + "\n".join(missing)


def test_shell_blocks_are_marked_bash():
    unmarked = [b.where for path in DOC_FILES for b in blocks(path)
                if b.lang in ("", "sh", "shell", "console")
                and any(line.startswith(("tokensieve ", "python ")) for line in b.text.splitlines())]
    assert not unmarked, f"command blocks without a language: {unmarked}"


@pytest.mark.parametrize("path", [p for p in DOC_FILES if _blocks_with_commands(p)], ids=lambda p: p.name)
def test_documented_commands_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the pages are written for a checkout's root
    values = {"small_search": str(_small_search_file(tmp_path))}
    (tmp_path / "assets_copy").mkdir()
    for block in _blocks_with_commands(path):
        if block.lang == "text":
            _synopsis_options_exist(block)
        elif block.lang == "python":
            if "simple_evaluate(" in block.text:  # lmms-eval's task data comes from the hub
                _check_lmms_eval_model_args(block.text.split('model_args="', 1)[1].split('"', 1)[0])
                continue
            exec(compile(block.text, block.where, "exec"), {"__name__": "__doc_block__"})
        else:
            for argv in commands(block):
                recipe = recipe_for(argv)
                if recipe.action == "parse":
                    _parse_only(argv)
                elif recipe.action == "run":
                    _run(apply(recipe, argv, values))
