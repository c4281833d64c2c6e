"""The command blocks of README.md and docs/*.md, and how the doc tests run each one here.

A ```bash block holds commands; a ```python block is run whole; a ```text block whose lines
start with ``tokensieve`` is a usage synopsis (``[--option VALUE]``), whose options must exist.
Every command meets the first :data:`RECIPES` entry whose pattern it matches:

- ``run``: executed as written, in a scratch folder shared by the blocks of its file (so a
  run folder written by one command is read by the next), with arguments appended that make
  it small (fewer steps, samples, repeats, budgets: later flags override earlier ones);
- ``parse``: it needs what this machine lacks (a GPU, a hub model or dataset, a cluster), so
  only its arguments go through tokensieve's own parser and config checks;
- ``skip``: the set-up commands that made the environment these tests run in.

A command that matches no recipe fails the tests: a new documented command needs a recipe.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


@dataclass
class Block:
    """One fenced block: ``lang`` (bash, python, text, ...), its text, where it starts."""

    file: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, in order."""
    text = path.read_text()
    return [Block(path, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def commands(block: Block) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, ``&&`` split."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    out: list[list[str]] = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            out.append(argv[:cut])
            argv = argv[cut + 1:]
    return out


SMALL_TRAIN = ["--set", "optim.steps=2", "--set", "optim.batch_size=4", "--set", "validation.every=2",
               "--set", "validation.samples=4", "--set", "run.checkpoint_every=2"]
SMALL_EVAL = ["--samples", "4", "--batch-size", "4", "--timing-samples", "1", "--kept-examples", "1"]


@dataclass
class Recipe:
    """How the doc tests treat the commands matching ``pattern`` (searched in the command line)."""

    pattern: str
    action: str  # run, parse or skip
    why: str = ""  # for parse and skip: what this machine lacks, or what already covers it
    extra: list[str] = field(default_factory=list)  # appended to a run
    subs: list[tuple[str, str]] = field(default_factory=list)  # (regex, replacement) on a run's arguments


RECIPES = [
    Recipe(r"^python3 -m venv ", "skip", "made the environment these tests run in (.ci/run runs this line)"),
    Recipe(r"^\.venv/bin/pip install -c requirements\.lock ", "skip",
           "installed the environment these tests run in; tests/test_lock.py checks it equals requirements.lock"),
    Recipe(r"^\.venv/bin/python -m pytest", "skip", "this test run"),
    Recipe(r"^pip install -e \.\[(clip|search|lmms|dist|tensorboard|all)\]$", "parse", "installs an extra: the extra must exist"),
    Recipe(r"--device cuda", "parse", "needs a CUDA GPU"),
    Recipe(r"llava-hf/llava-1\.5-7b-hf|/data/", "parse", "needs LLaVA-1.5-7B (and its data) from the hub"),
    Recipe(r"--pretrained openai", "parse", "needs OpenAI's CLIP weights and CIFAR-10 from the network"),
    Recipe(r"postgresql://", "parse", "needs a PostgreSQL server"),
    Recipe(r"--nproc_per_node 8|--num_processes 8", "parse", "needs a machine with 8 GPUs"),
    Recipe(r"--tasks ", "parse", "needs lmms-eval's task data from the hub"),
    Recipe(r"--dataset vqav2_val/", "parse", "needs VQAv2's validation set, saved from the hub"),
    Recipe(r"--model Qwen/Qwen", "parse", "needs a Qwen-VL checkpoint from the hub"),
    Recipe(r"^(\.venv/bin/)?tokensieve demo", "run",
           extra=["--samples", "4", "--budget", "0.22", "--timing-samples", "1", *SMALL_TRAIN]),
    Recipe(r"^tokensieve train ", "run", extra=SMALL_TRAIN, subs=[(r"run\.seed=S$", "run.seed=0"),
                                                                   (r"^runs/sS$", "runs/s0")]),
    Recipe(r"^tokensieve eval ", "run", extra=SMALL_EVAL, subs=[(r"^runs/sS$", "runs/s0")]),
    Recipe(r"^tokensieve methods$", "run"),
    Recipe(r"^tokensieve ask ", "run"),
    Recipe(r"^tokensieve bench speed --shape qwen2\.5-vl-cpu ", "parse",
           "a Qwen2.5-VL-shaped prefill of 1,374 tokens takes seconds per case on a CPU; tests/test_qwen_bench.py "
           "runs the command on a tiny Qwen shape"),
    Recipe(r"^tokensieve bench speed --shape llava-next-cpu ", "parse",
           "a LLaVA-NeXT-shaped prefill of 2,968 tokens takes seconds per case on a CPU; tests/test_next_bench.py "
           "runs the command on a tiny LLaVA-NeXT shape"),
    # one budget of the three (each runs the same code), one probe per method
    Recipe(r"^tokensieve bench speed ", "run", extra=["--repeats", "1", "--new-tokens", "2", "--budget", "0.22"]),
    Recipe(r"^tokensieve bench capacity ", "run", extra=["--max-batch", "1", "--new-tokens", "2", "--repeats", "1"]),
    Recipe(r"^tokensieve search ", "run", extra=["--trials", "1"],
           subs=[(r"^configs/search_testbed\.yaml$", "{small_search}")]),
    Recipe(r"^tokensieve clip-benchmark write-data ", "run",
           extra=["--classification-images", "36", "--retrieval-images", "20"]),
    Recipe(r"^tokensieve clip-benchmark compare ", "run", extra=["--latency_batch", "4", "--latency_repeats", "1"]),
    Recipe(r"^tokensieve clip-benchmark eval ", "run"),
    Recipe(r"^tokensieve clip-benchmark train-tiny ", "run", extra=["--steps", "2"]),
    Recipe(r"^tokensieve clip-benchmark speed ", "run", extra=["--batch", "1", "--repeats", "1"]),
    Recipe(r"^tokensieve clip-benchmark export-tiny ", "run"),
    Recipe(r"^cp runs/tiny_clip/", "run", subs=[(r"^src/tokensieve/assets/tiny_clip/$", "assets_copy/")]),
    Recipe(r"^torchrun --nproc_per_node 2 ", "run", extra=SMALL_TRAIN),
]


def recipe_for(argv: list[str]) -> Recipe | None:
    line = " ".join(argv)
    return next((r for r in RECIPES if re.search(r.pattern, line)), None)


def apply(recipe: Recipe, argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the recipe's substitutions (``{name}`` filled from ``values``) and extras."""
    out = []
    for arg in argv:
        for pattern, replacement in recipe.subs:
            arg = re.sub(pattern, replacement.format(**values), arg)
        out.append(arg)
    return out + recipe.extra
