"""docs/models.md says what the code does: each family's signals per site, each method's signals, and
where each method's default runs or is refused (and the options the page says make it run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_clip_text import save_tiny_clip

from tokensieve.attach import attach
from tokensieve.backbones.base import Site
from tokensieve.errors import TokensieveError
from tokensieve.methods import create_method, list_methods, method_class

PAGE = Path(__file__).resolve().parent.parent / "docs" / "models.md"


def table(heading: str, header: bool = False) -> list[list[str]]:
    """The rows (cells, stripped) of the first table after ``## heading`` on the page; with ``header``
    its header row first."""
    text = PAGE.read_text().split(f"## {heading}\n", 1)[1]
    lines = [line for line in text.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return rows[:1] + rows[2:] if header else rows[2:]


def names(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """Method name -> an instance for the tiny models (CDPruner's CLIP text encoder a tiny one;
    PyramidDrop and SparseVLM at layers the tiny LLMs have)."""
    clip = save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), width=32)
    needs = {"cdpruner": {"text_encoder": str(clip)}, "pyramiddrop": {"layers": (1, 2)},
             "sparsevlm": {"layers": (1, 2), "scale": 9.0, "bias": 6.0}}
    return lambda name, **extra: create_method(name, **{**needs.get(name, {}), **extra})


def site_of(site: str, depth: int) -> list[Site]:
    """The sites a row's ``site`` cell names on a model whose LLM has ``depth`` layers."""
    return [Site("llm", k) for k in range(1, depth)] if site == "`llm.k`" else [Site.parse(site.strip("`"))]


def check_signals(family: str, backbone) -> None:
    """The signals table's rows of ``family`` are what ``backbone`` offers, at every one of its sites."""
    rows = [row for row in table("Signals at each site") if row[0] == family]
    assert rows
    for _, site, signals in rows:
        if site == "`vision.i`":
            sites = [s for s in backbone.sites() if s.stage == "vision"]
        else:
            sites = site_of(site, len(backbone.llm_layers))
        for s in sites:
            assert backbone.signals_at(s) == names(signals), f"{family} {s}"
    listed = {s for _, site, _ in rows for s in (site_of(site, len(backbone.llm_layers)) if site != "`vision.i`"
                                                 else [s for s in backbone.sites() if s.stage == "vision"])}
    assert listed == set(backbone.sites())


def test_every_method_is_listed_with_the_signals_it_reads():
    rows = table("Methods on each family")
    assert [row[0].strip("`") for row in rows] == sorted(list_methods())
    for row in rows:
        assert names(row[1]) == set(method_class(row[0].strip("`")).signals), row[0]


def options(cell: str) -> dict:
    """The keyword options a cell names as ``key="value"`` pairs (its last backticked span that has any)."""
    spans = [span for span in re.findall(r"`([^`]+)`", cell) if "=" in span]
    return dict(re.findall(r'(\w+)="([^"]*)"', spans[-1])) if spans else {}


def attached(backbone, method, site: str | None) -> str | None:
    """None when ``method`` attaches (then it is detached), else the one-line refusal."""
    try:
        handle = attach(backbone, method, 0.5, site=site)
    except TokensieveError as err:
        assert "\n" not in str(err)
        return str(err)
    handle.detach()
    return None


def check_methods(family: str, backbone, make) -> None:
    """Each method's default attaches on ``backbone`` or is refused in one line, as ``family``'s column
    says, and the site or options a refused cell names make it attach."""
    heads, *rows = table("Methods on each family", header=True)
    at = heads.index(family)
    for row in rows:
        name, cell = row[0].strip("`"), row[at]
        refusal = attached(backbone, make(name), None)
        if cell.startswith("runs"):
            assert refusal is None, f"{name} on {family}: {refusal}"
            continue
        assert cell.startswith("refused") and refusal is not None, f"{name} on {family} attaches"
        site = re.search(r"runs at `([^`]+)`", cell)
        if site or options(cell):
            site = site and site.group(1)
            assert attached(backbone, make(name, **options(cell)), site) is None, \
                f"{name}{options(cell)} at {site} on {family}"


def test_llava_15_is_as_documented(backbone, make):
    check_signals("LLaVA-1.5", backbone)
    check_methods("LLaVA-1.5", backbone, make)


def test_llava_next_is_as_documented(llava_next, make):
    check_signals("LLaVA-NeXT", llava_next)
    check_methods("LLaVA-NeXT", llava_next, make)


def test_qwen_vl_is_as_documented(qwen, make):  # each of Qwen2-VL, Qwen2.5-VL and Qwen3-VL
    check_signals("Qwen-VL", qwen)
    if qwen.deepstack_levels:  # SparseVLM's tokens come after the tiny Qwen3-VL's DeepStack layers 0 and 1
        check_methods("Qwen-VL", qwen, lambda name, **extra: make(name, **{
            **({"layers": (2,)} if name == "sparsevlm" else {}), **extra}))
    else:
        check_methods("Qwen-VL", qwen, make)


def test_llava_onevision_is_as_documented(onevision, make):
    check_signals("LLaVA-OneVision", onevision)
    check_methods("LLaVA-OneVision", onevision, make)


def test_llava_next_video_is_as_documented(next_video, make):
    check_signals("LLaVA-NeXT-Video", next_video)
    check_methods("LLaVA-NeXT-Video", next_video, make)
