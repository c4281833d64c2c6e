"""tools/gpu-bench, the script a session with a lent GPU runs there (issue 27): it is valid bash, each of
its steps' arguments goes through ``tokensieve bench speed``'s own parser and asks for a GPU shape on
CUDA, and it pins the transformers wheel it carries to the lock's."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tokensieve.cli import build_parser

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu-bench"


def steps() -> list[tuple[str, int, list[str]]]:
    """``(name, cap seconds, bench arguments)`` of each ``step`` line."""
    lines = [shlex.split(line) for line in TOOL.read_text().splitlines() if line.startswith("step ")]
    return [(name, int(cap), args) for _, name, cap, *args in lines]


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(TOOL)], check=True)


def test_every_step_parses_and_runs_a_gpu_shape_on_cuda():
    found = steps()
    assert len(found) >= 3 and len({name for name, _, _ in found}) == len(found)
    for name, cap, args in found:
        parsed = build_parser().parse_args(["bench", "speed", *args, "--json"])
        assert parsed.device == "cuda" and parsed.shape.endswith("-7b"), name
        assert re.fullmatch(r"[A-Za-z0-9_]+", name) and 60 <= cap <= 600  # a file name $OUT brings back
    assert sum(cap for _, cap, _ in found[:2]) <= 480  # the first two fit the default budget
    assert len(found) + 1 <= 8  # $OUT brings back 8 files: one JSON per step and bench.log
