"""The report's figures and gallery: intervals, colours and markers that tell methods apart,
points that never hide each other, integer token axes, small multiples, the kept-token
gallery with answers, and the timing pass's spread, warning and progress bar."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image

from tokensieve.cli import main
from tokensieve.errors import TokensieveError
from tokensieve.evaluate import latency
from tokensieve.evaluate.intervals import accuracy_interval, quartiles, wilson_interval
from tokensieve.evaluate.kept_overlays import Example, gallery_file, gold_text, plot_gallery
from tokensieve.evaluate.plots import (MARKERS, PALETTE, dodge_offsets, method_styles, plot_accuracy_vs_tokens,
                                       plot_tokens_per_layer)
from tokensieve.evaluate.report import load_report, write_report

N = 200
META = {"model": "tiny-llava", "mode": "soft"}
GRID = 4  # 16 patches


def row(method: str, budget: str, kept: int, accuracy: float, tokens: list[int] | None = None) -> dict:
    flops = {"total": 100 * kept + 1000}
    return {"method": method, "site": None if method == "none" else "projector", "budget": budget,
            "visual_tokens_kept": kept, "accuracy": accuracy, **accuracy_interval([1.0] * round(accuracy * N)
                                                                                  + [0.0] * round((1 - accuracy) * N)),
            "per_family": {"all": accuracy}, "flops": flops, "flops_ratio": flops["total"] / 2600,
            "tokens_per_llm_layer": tokens or [10 + kept] * 3}


def test_wilson_interval_matches_published_values():
    assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(1.0, 100) == pytest.approx((0.9630, 1.0), abs=1e-4)  # never zero wide at 1
    assert wilson_interval(0.0, 5)[0] == 0.0
    assert accuracy_interval([1, 0, 1, 1]) == {"n": 4, "accuracy_ci95": [0.3006, 0.9544]}
    with pytest.raises(ValueError, match="at least one item"):
        wilson_interval(0.5, 0)


def test_quartiles_of_timings():
    assert quartiles([5.0, 1.0, 3.0, 2.0, 100.0]) == (2.0, 3.0, 5.0)  # one slow run moves q3, not the median
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_eleven_methods_each_get_their_own_marker_and_colour_with_line():
    rows = [row("none", "1.0", 16, 1.0), *(row(f"m{i}", "8", 8, 0.5) for i in range(11))]
    styles = list(method_styles(rows).values())
    assert len({s["marker"] for s in styles}) == 11 and {s["marker"] for s in styles} <= set(MARKERS)
    assert {s["color"] for s in styles} <= set(PALETTE)  # Okabe-Ito: told apart with colour-blind vision
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 11


def test_points_are_dodged_only_when_they_and_their_bars_would_overlap():
    spans = [(100, 10, 30), (102, 25, 45), (100, 200, 220), (300, 10, 30), (101, 40, 60)]
    assert dodge_offsets(spans, tol=9) == [-1.0, 0.0, 0.0, 0.0, 1.0]  # 0-1-4 chain; 2 and 3 alone


def test_one_budget_gets_integer_ticks_visible_points_and_a_title_with_model_mode_and_n(tmp_path):
    rows = [row("none", "1.0", 16, 0.95), row("random", "8", 8, 0.70), row("divprune", "8", 8, 0.72),
            row("object_oracle", "0.5", 6, 0.9), row("object_oracle", "0.4", 6, 0.9)]
    fig = plot_accuracy_vs_tokens(rows, META, tmp_path / "a.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["6", "8", "16"]
    assert "tiny-llava · soft mode · n = 200 items" in ax.get_title()
    x_of = {bars.get_label(): bars.lines[0].get_xdata() for bars in ax.containers}  # each method's points
    (random_x,), (divprune_x,) = x_of["random @ projector"], x_of["divprune @ projector"]
    assert random_x != divprune_x and abs(np.log(random_x / 8)) < 0.1  # nudged apart, still at about 8
    oracle_x = x_of["object_oracle @ projector"]
    assert oracle_x[0] != oracle_x[1]  # both of the oracle's budgets are seen...
    assert any(t.get_text() == "budget 0.5 = 0.4" for t in ax.texts)  # ...and named
    low, high = ax.get_ylim()
    assert low <= min(r["accuracy_ci95"][0] for r in rows) and high >= 1.0


def test_tokens_per_layer_has_a_panel_per_method_with_integer_axes(tmp_path):
    rows = [row("none", "1.0", 16, 1.0), row("fastv", "8", 8, 0.9, [26, 18, 18]),
            row("fastv", "4", 4, 0.8, [26, 14, 14]), row("object_oracle", "0.5", 6, 0.9),
            row("object_oracle", "0.4", 6, 0.9)]
    fig = plot_tokens_per_layer(rows, META, tmp_path / "t.png")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["fastv @ projector", "object_oracle @ projector"]
    assert [t.get_text() for t in panels[1].get_legend().get_texts()] == ["budget 0.5 = 0.4"]  # one line, both named
    for ax in panels:
        assert all(float(t).is_integer() for t in [*ax.get_yticks(), *ax.get_xticks()])


def gallery_rows() -> tuple[list[dict], list[Example]]:
    """The baseline and two methods at two budgets, with answers and kept patches on items a, b."""
    examples = [Example("a", "What color is the circle?", ["red"], np.full((32, 32, 3), 30, np.uint8)),
                Example("b", "How many?", ["2"] * 7 + ["3"] * 3, np.full((32, 32, 3), 200, np.uint8))]
    rows = [row("none", "1.0", 16, 1.0)]
    for method, budget, kept in (("random", "0.5", 8), ("random", "0.25", 4), ("two_stage", "0.5", 8)):
        rows.append(row(method, budget, kept, 0.8))
        stages = {f"{method}@projector:{budget}": [list(range(kept)), list(range(8, 8 + kept))]}
        if method == "two_stage":  # its head in the LLM keeps half the merger's centres
            stages["two_stage@llm.1:0.5"] = [list(range(4)) + [-2] * 4, list(range(8, 12)) + [-2] * 4]
        rows[-1]["kept_tokens"] = {"ids": ["a", "b"], "stages": stages}
    for r, answers in zip(rows, (["red", "2"], ["red", "3"], ["blue", "2"], ["red", "3"])):
        r["examples"] = {"ids": ["a", "b"], "predictions": answers, "scores": [1.0 if a in ("red", "2") else 0.0
                                                                                for a in answers]}
    rows[1]["examples"]["scores"][1] = 0.9  # a VQA soft score: 3 of 10 annotators said 3
    return rows, examples


def test_the_gallery_shows_every_method_and_budget_on_the_same_items_with_answers(tmp_path):
    rows, examples = gallery_rows()
    paths = write_report(rows, META, tmp_path, examples, GRID)
    for qid in ("a", "b"):
        with Image.open(paths[gallery_file(qid)]) as im:
            assert im.format == "PNG" and im.size[0] > 300
    md = paths["report.md"].read_text()
    assert "![kept tokens and answers on item a](kept_tokens/item_a.png)" in md
    assert "| random | projector | 0.25 | blue ✗ wrong | 2 ✓ right |" in md
    assert "| random | projector | 0.5 | red ✓ right | 3 ≈ 0.90 |" in md
    assert paths["report.html"].read_text().count('src="data:image/png;base64,') == 3 + 2
    fig = plot_gallery(rows, examples[1], GRID, META, tmp_path / "b.png")
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles == ["unpruned · 16 tokens\n“2” ✓ right", "budget 0.5 · 8 tokens\n“3” ≈ 0.90",
                      "budget 0.25 · 4 tokens\n“2” ✓ right", "budget 0.5 · 4 tokens\n“3” ✗ wrong"]
    assert "item b: How many?\nreference answer: 2 (7) / 3 (3)\ntiny-llava · soft mode" in fig.get_suptitle()


def test_reference_answers_are_shown_most_voted_first():
    assert gold_text(["red"]) == "red"
    assert gold_text(["a", "b"]) == "a / b"
    assert gold_text(["x"] * 5 + ["y"] * 3 + ["z", "w"], most=2) == "x (5) / y (3) / …"


@pytest.mark.parametrize("change,needle", [
    (lambda rows, ex: ex.pop(), "no example image for pictured item(s) b"),
    (lambda rows, ex: rows[2].pop("examples"), "give them to every row or to none"),
    (lambda rows, ex: rows[2].pop("kept_tokens"), "random budget=0.25 has answers on the pictured items but no kept"),
    (lambda rows, ex: rows[3]["examples"].update(ids=["b", "a"]), "pictures other items than the baseline"),
])
def test_a_gallery_missing_a_piece_is_refused_before_writing(tmp_path, change, needle):
    rows, examples = gallery_rows()
    change(rows, examples)
    with pytest.raises(TokensieveError, match=re.escape(needle)):
        write_report(rows, META, tmp_path / "out", examples, GRID)
    assert not (tmp_path / "out").exists()


def test_eval_times_with_spread_warns_when_noisy_and_pictures_the_answers(tiny_llava_dir, tmp_path, capsys,
                                                                         monkeypatch):
    first_token = itertools.cycle([0.010, 0.030])  # a busy machine: every other run three times slower

    def fake_seconds(backbone, batch, new_tokens):
        return next(first_token) if new_tokens == 1 else 0.1

    monkeypatch.setattr(latency, "_generate_seconds", fake_seconds)
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random", "--budget", "8", "--oracle",
                 "--samples", "4", "--timing-samples", "2", "--kept-examples", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "timing:" in err  # the timing pass's progress bar
    assert "tokensieve: warning: timings are noisy:" in err
    rows = load_report(out)["rows"]
    for r in rows:  # TTFT of 10 and 30 ms: median 20, IQR 15-25 (50%)
        assert (r["ttft_ms"], r["ttft_ms_iqr"]) == (20.0, [15.0, 25.0]) and r["n"] == 4
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
    assert "**Warning: timings are noisy:" in (out / "report.md").read_text()
    logged = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()[1:]]
    random_row = rows[1]
    assert random_row["examples"]["ids"] == random_row["kept_tokens"]["ids"] == [logged[0]["id"], logged[1]["id"]]
    logged_random = [r["prediction"] for r in logged if r["run"] == "random@projector:8"]
    assert random_row["examples"]["predictions"] == logged_random[:2]
    for qid in random_row["examples"]["ids"]:
        assert (out / gallery_file(qid)).stat().st_size > 5000
    assert main(["eval", "--model", str(tiny_llava_dir), "--method", "random", "--budget", "8", "--samples", "4",
                 "--timing-samples", "2", "--json"]) == 0
    assert "timing:" not in capsys.readouterr().err  # --json: no progress bars
