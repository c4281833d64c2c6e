"""The eval report: JSON that round-trips, a Markdown summary with the right numbers, three valid plots,
an HTML page that holds everything itself, timings with their spread."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from PIL import Image

from tokensieve.errors import TokensieveError
from tokensieve.evaluate.intervals import accuracy_interval
from tokensieve.evaluate.kept_overlays import FADE, fade_dropped
from tokensieve.evaluate.report import format_gflops, layer_runs, load_report, timing_warning, write_report
from tokensieve.evaluate.report_blocks import markdown_table

FAMILIES = ("color_of_shape", "count", "spatial")
TEXT, VISUAL, LAYERS = 20, 64, 4
PLOTS = ("accuracy_vs_tokens.png", "accuracy_vs_flops.png", "tokens_per_layer.png")
FILES = ("report.json", "report.md", "report.html", *PLOTS)
N = 500


def make_row(method: str, site: str | None, budget, kept: int, accuracy: float, cut_layer: int) -> dict:
    """A row as ``compare_methods`` returns it: ``kept`` visual tokens from decoder layer ``cut_layer`` on."""
    tokens = [TEXT + (VISUAL if k < cut_layer else kept) for k in range(LAYERS)]
    llm = sum(1_000_000 * n for n in tokens)
    flops = {"vision": 5_000_000, "projector": 300_000, "llm": llm, "lm_head": 70_000}
    flops["total"] = sum(flops.values())
    return {"method": method, "site": site, "budget": budget, "visual_tokens_kept": kept, "accuracy": accuracy,
            **accuracy_interval([1.0] * round(accuracy * N) + [0.0] * (N - round(accuracy * N))),
            "per_family": {f: round(accuracy - 0.01 * i, 4) for i, f in enumerate(FAMILIES)},
            "flops": flops, "flops_ratio": None, "tokens_per_llm_layer": tokens}


@pytest.fixture
def rows() -> list[dict]:
    rows = [make_row("none", None, 1.0, VISUAL, 0.9, 0)]
    for kept, acc_random, acc_fastv in ((32, 0.8, 0.85), (16, 0.6, 0.75), (8, 0.4, 0.55)):
        rows.append(make_row("random", "projector", str(kept), kept, acc_random, 0))
        rows.append(make_row("fastv", "llm:2", str(kept), kept, acc_fastv, 2))
    for r in rows:
        r["flops_ratio"] = round(r["flops"]["total"] / rows[0]["flops"]["total"], 4)
    return rows


META = {"model": "shipped testbed", "mode": "hard", "samples": 500, "text_tokens_for_flops": TEXT,
        "command": "tokensieve eval --method random,fastv --budget 32,16,8 --out r", "tokensieve_version": "0.1.0",
        "date": "2025-01-01T00:00:00+00:00"}


def main_table(md: str) -> list[list[str]]:
    """Cells of the first Markdown table (the main one), header and separator dropped."""
    lines = md.split("## Accuracy and prefill cost", 1)[1].split("## ", 1)[0].splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]


def test_writes_six_non_empty_files_and_returns_them_by_name(rows, tmp_path):
    out = tmp_path / "new" / "report"
    paths = write_report(rows, META, out)
    assert set(paths) == set(FILES)
    for name in FILES:
        assert paths[name] == out / name and paths[name].stat().st_size > 0


def test_plots_are_valid_pngs_of_sensible_size(rows, tmp_path):
    paths = write_report(rows, META, tmp_path)
    for name in PLOTS:
        with Image.open(paths[name]) as im:
            im.verify()
        with Image.open(paths[name]) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert 400 <= w <= 3000 and 300 <= h <= 2000, im.size


def test_json_round_trips_through_load_report(rows, tmp_path):
    original = copy.deepcopy(rows)
    write_report(rows, META, tmp_path)
    assert load_report(tmp_path) == {"meta": META, "rows": original}
    assert rows == original  # the input is not modified


def test_markdown_names_methods_baseline_and_families(rows, tmp_path):
    md = write_report(rows, META, tmp_path)["report.md"].read_text()
    for name in ("none", "random", "fastv", *FAMILIES, *PLOTS):
        assert name in md
    assert "0.900" in md  # the baseline accuracy, 3 decimals
    assert META["command"] in md
    family_header = next(ln for ln in md.splitlines() if ln.startswith("| method") and "count" in ln)
    assert [c.strip() for c in family_header.strip("|").split("|")][3:] == list(FAMILIES)


def test_change_vs_baseline_is_accuracy_minus_baseline(rows, tmp_path):
    table = main_table(write_report(rows, META, tmp_path)["report.md"].read_text())
    assert [r[0] for r in table] == [r["method"] for r in rows]
    assert table[0][7] == "—"
    for cells, row in zip(table[1:], rows[1:]):
        assert float(cells[5]) == pytest.approx(row["accuracy"], abs=5e-4)
        assert float(cells[7]) == pytest.approx(row["accuracy"] - rows[0]["accuracy"], abs=5e-4)
    fastv_8 = next(c for c in table if c[0] == "fastv" and c[2] == "8")
    assert fastv_8[7] == "-0.350" and fastv_8[3] == "8"
    assert float(fastv_8[9]) == pytest.approx(rows[-1]["flops_ratio"], abs=5e-4)


def test_each_accuracy_has_its_wilson_interval_and_the_report_states_n(rows, tmp_path):
    md = write_report(rows, META, tmp_path)["report.md"].read_text()
    table = main_table(md)
    assert table[0][6] == "0.871–0.923"  # 450 of 500: Wilson [0.8706, 0.9233]
    assert table[-1][6] == "0.506–0.593"  # 275 of 500
    assert "n = 500 items" in md
    assert load_report(tmp_path)["rows"][0]["accuracy_ci95"] == [0.8706, 0.9233]


def test_timings_show_their_interquartile_range_and_a_large_one_is_flagged(rows, tmp_path):
    for row in rows:
        row |= {"ttft_ms": 20.0, "ttft_ms_iqr": [19.0, 22.0], "decode_ms_per_token": 4.0,
                "decode_ms_per_token_iqr": [3.9, 4.1]}
    assert timing_warning(rows) is None  # spreads of 15% and 5%: under the 25% threshold
    md = write_report(rows, META, tmp_path)["report.md"].read_text()
    assert main_table(md)[0][10:12] == ["20.00 [19.00–22.00]", "4.00 [3.90–4.10]"]
    assert "timings are noisy" not in md
    rows[2]["decode_ms_per_token_iqr"] = [3.0, 9.0]  # a busy machine: IQR 150% of the median
    warning = timing_warning(rows)
    assert warning.startswith("timings are noisy: 1 of 14 timings") and "150% (decode of fastv budget=32)" in warning
    assert f"**Warning: {warning}.**" in write_report(rows, META, tmp_path)["report.md"].read_text()


def test_an_untimed_report_shows_dashes_and_no_warning(rows, tmp_path):
    for row in rows:
        row |= {"ttft_ms": None, "ttft_ms_iqr": None, "decode_ms_per_token": None, "decode_ms_per_token_iqr": None}
    assert timing_warning(rows) is None
    assert main_table(write_report(rows, META, tmp_path)["report.md"].read_text())[0][10:12] == ["—", "—"]


def test_markdown_embeds_every_figure_and_the_html_page_holds_them_itself(rows, tmp_path):
    paths = write_report(rows, META, tmp_path)
    md, page = paths["report.md"].read_text(), paths["report.html"].read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert embedded == list(PLOTS)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('<img alt="') == len(PLOTS) == page.count('src="data:image/png;base64,iVBORw0KGgo')
    assert not re.search(r"<script|https?://|src=\"(?!data:)", page)  # nothing to run, nothing to fetch
    assert "<td>fastv</td>" in page and "&lt;" not in META["command"] and META["command"] in page


def test_tokens_per_layer_are_listed_as_runs_of_layers(rows, tmp_path):
    assert layer_runs([84, 84, 28, 28, 28]) == "84 (0–1), 28 (2–4)"
    assert layer_runs([40, 84, 84]) == "40 (0), 84 (1–2)"
    md = write_report(rows, META, tmp_path)["report.md"].read_text()
    assert "| fastv | llm:2 | 8 | 84 (0–1), 28 (2–3) |" in md


def test_gflops_have_three_significant_digits_without_exponents():
    assert format_gflops(8_437_000_000_000) == "8,440"
    assert format_gflops(12_345_000_000) == "12.3"
    assert format_gflops(12_345) == "0.0000123"


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n| --- | --- |\n| x\\|y | 1 |"


def drop(index: int, *keys: str):
    """A mutation removing ``keys`` from row ``index``."""
    def mutate(rows: list[dict]) -> None:
        for key in keys:
            del rows[index][key]
    return mutate


@pytest.mark.parametrize("mutate,needle", [
    (list.clear, "the report has no rows"),
    (lambda rows: rows.pop(0), "the first report row must be the unpruned baseline (method 'none'), not 'random'"),
    (drop(2, "accuracy"), "report row 2 (fastv) lacks accuracy"),
    (drop(3, "flops", "tokens_per_llm_layer"), "report row 3 (random) lacks flops, tokens_per_llm_layer"),
    (lambda rows: rows[1]["flops"].pop("total"), "report row 1 (random): flops must be a dict with a 'total'"),
    (lambda rows: rows.__setitem__(1, "random"), "report row 1 is a str, not a dict"),
])
def test_bad_rows_raise_and_write_nothing(rows, tmp_path, mutate, needle):
    mutate(rows)
    out = tmp_path / "report"
    with pytest.raises(TokensieveError, match=re.escape(needle)):
        write_report(rows, META, out)
    assert not out.exists()


def test_unserialisable_meta_raises_before_writing(rows, tmp_path):
    out = tmp_path / "report"
    with pytest.raises(TokensieveError, match="cannot be written as JSON"):
        write_report(rows, {"model": object()}, out)
    assert not out.exists()


def test_load_report_without_a_report_names_the_file(tmp_path):
    with pytest.raises(TokensieveError, match="report.json does not exist"):
        load_report(tmp_path)


def test_dropped_patches_fade_towards_white_by_the_share_of_stages_that_dropped_them():
    image = np.full((6, 6, 3), 40, np.uint8)  # a 3 x 3 grid of 2-pixel patches
    # The first stage keeps CLS (-1, no square) and patches 0, 5, 7; the second keeps 0 (-2 pads its row).
    shown = fade_dropped(image, [[-1, 0, 5, 7], [0, -2]], grid=3)
    faded, half = 40 + round(FADE * 215), 40 + round(FADE * 215 / 2)
    assert (shown[::2, ::2, 0] == [[40, faded, faded], [faded, faded, half], [faded, half, faded]]).all()
    assert (shown[1::2, 1::2] == shown[::2, ::2]).all()  # whole patches
    assert fade_dropped(image, [], grid=3) is image  # the unpruned model drops nothing
    odd = fade_dropped(np.zeros((7, 7, 3), np.uint8), [[0]], grid=3)  # 7 pixels over 3 patches: 3, 2, 2
    assert (odd[:3, :3] == 0).all() and (odd[3:, :] > 0).all() and (odd[:, 3:] > 0).all()


def test_fade_dropped_draws_a_grid_of_its_own_rows_and_columns():
    image = np.zeros((4, 6, 3), np.uint8)  # 2 x 3 tokens of 2 x 2 pixels (a Qwen-VL image's own grid)
    shown = fade_dropped(image, [[1, 5]], grid=(2, 3))[..., 0]
    faded = round(255 * FADE)
    kept = np.array([[0, 1, 0], [0, 0, 1]], bool).repeat(2, 0).repeat(2, 1)
    assert (shown[kept] == 0).all() and (shown[~kept] == faded).all()
