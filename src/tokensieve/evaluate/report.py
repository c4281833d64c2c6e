"""A report of ``tokensieve eval``: the rows of :func:`~tokensieve.evaluate.accuracy.compare_methods`
as JSON, the same as tables and figures in ``report.md`` and in a self-contained ``report.html``:
accuracy with 95% intervals against visual tokens and against prefill FLOPs, tokens per LLM
layer, timings with their spread, and a gallery of what every row kept and answered on the
same few items."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from tokensieve.checkpoint import atomic_write_text
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.kept_overlays import (
    Example,
    gallery_file,
    plot_gallery,
    verdict,
)
from tokensieve.evaluate.latency import NOISY_SPREAD, noisy_timing_warning
from tokensieve.evaluate.plots import (
    BASELINE,
    plot_accuracy_vs_flops,
    plot_accuracy_vs_tokens,
    plot_tokens_per_layer,
)
from tokensieve.evaluate.report_blocks import (
    Block,
    Facts,
    Heading,
    Paragraph,
    Picture,
    Table,
    to_html,
    to_markdown,
)

ROW_KEYS = ("method", "site", "budget", "visual_tokens_kept", "accuracy", "n", "accuracy_ci95", "per_family", "flops",
            "flops_ratio", "tokens_per_llm_layer")
ACCURACY_PLOT = "accuracy_vs_tokens.png"
COST_PLOT = "accuracy_vs_flops.png"
LAYERS_PLOT = "tokens_per_layer.png"
MISSING = "—"

def check_rows(rows: list[dict]) -> None:
    """Raise :class:`TokensieveError` unless ``rows`` is a non-empty list of complete rows whose first
    row is the unpruned baseline (``method`` ``"none"``)."""
    if not isinstance(rows, list) or not rows:
        raise TokensieveError("the report has no rows: expected the baseline row, then one per method and budget")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TokensieveError(f"report row {i} is a {type(row).__name__}, not a dict")
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise TokensieveError(f"report row {i} ({row.get('method', '?')}) lacks {', '.join(missing)}")
        if not isinstance(row["per_family"], dict):
            raise TokensieveError(f"report row {i} ({row['method']}): per_family must be a dict of family -> accuracy")
        if not isinstance(row["flops"], dict) or "total" not in row["flops"]:
            raise TokensieveError(f"report row {i} ({row['method']}): flops must be a dict with a 'total'")
    if rows[0]["method"] != BASELINE:
        raise TokensieveError(f"the first report row must be the unpruned baseline (method {BASELINE!r}), "
                              f"not {rows[0]['method']!r}")


def format_gflops(flops: int) -> str:
    """``flops`` in GFLOPs to 3 significant digits, never in exponent notation (``8440``, ``0.0123``)."""
    return format(Decimal(f"{flops / 1e9:.3g}"), ",f")


def format_change(accuracy: float, baseline: float) -> str:
    """``accuracy - baseline`` with a sign and 3 decimals (``+0.012``, ``-0.250``)."""
    return f"{accuracy - baseline:+.3f}"


def row_label(row: dict) -> str:
    """``method budget=...`` for a pruned row, ``none (baseline)`` for the unpruned one."""
    return f"{row['method']} (baseline)" if row["method"] == BASELINE else f"{row['method']} budget={row['budget']}"


def families(rows: list[dict]) -> list[str]:
    """Question families over all rows: the baseline's order, then any the baseline lacks."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row["per_family"]))
    return list(names)


def timing_warning(rows: list[dict]) -> str | None:
    """The line saying which rows' timings are too noisy to quote (:func:`noisy_timing_warning`), or None."""
    return noisy_timing_warning(rows, [row_label(r) for r in rows])


def _number(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _timing(row: dict, field: str) -> str:
    """``median [q1–q3]`` of a timed field, the median alone without quartiles, — when not timed."""
    iqr = row.get(f"{field}_iqr")
    return _number(row.get(field)) + ("" if iqr is None else f" [{iqr[0]:.2f}–{iqr[1]:.2f}]")


def layer_runs(counts: list[int]) -> str:
    """Tokens per layer as runs of equal counts: ``112 (0–1), 45 (2–7)``."""
    runs: list[list[int]] = []  # [count, first layer, last layer]
    for layer, count in enumerate(counts):
        if runs and runs[-1][0] == count:
            runs[-1][2] = layer
        else:
            runs.append([count, layer, layer])
    return ", ".join(f"{c} ({a})" if a == b else f"{c} ({a}–{b})" for c, a, b in runs)


def report_blocks(rows: list[dict], meta: dict, gallery: Sequence[str] = ()) -> list[Block]:
    """The report: meta, main table, per-family table, tokens per layer, the figures, the paired
    comparisons, and the kept-token gallery of the items ``gallery`` (question ids)."""
    base = rows[0]["accuracy"]
    main = [[r["method"], r["site"] or MISSING, r["budget"], r["visual_tokens_kept"],
             _number(r.get("visual_tokens_mean_llm"), 1), f"{r['accuracy']:.3f}",
             f"{r['accuracy_ci95'][0]:.3f}–{r['accuracy_ci95'][1]:.3f}",
             MISSING if i == 0 else format_change(r["accuracy"], base), format_gflops(r["flops"]["total"]),
             f"{r['flops_ratio']:.3f}", _timing(r, "ttft_ms"), _timing(r, "decode_ms_per_token"),
             _number(None if r.get("kv_cache_bytes") is None else r["kv_cache_bytes"] / 1024, 1)]
            for i, r in enumerate(rows)]
    names = families(rows)
    per_family = [[r["method"], r["site"] or MISSING, r["budget"],
                   *(f"{r['per_family'][f]:.3f}" if f in r["per_family"] else MISSING for f in names)] for r in rows]
    sizes = ", ".join(str(n) for n in sorted({r["n"] for r in rows}))
    warning = timing_warning(rows)
    return [
        Heading("tokensieve eval report", 1),
        Facts(list(meta.items())),
        Heading("Accuracy and prefill cost"),
        *([Paragraph(f"Warning: {warning}.", strong=True)] if warning else []),
        Table(["method", "site", "budget", "visual tokens kept", "mean visual tokens in LLM", "accuracy", "95% CI",
               "change vs baseline", "prefill GFLOPs", "FLOPs ratio", "TTFT ms [IQR]", "decode ms/token [IQR]",
               "KV cache KiB"], main),
        Paragraph(
            f"Every row answers the same n = {sizes} items. Accuracy: the mean score; 95% CI: its Wilson score "
            "interval (for VQA soft scores an approximation, a little wide). Visual tokens kept: after the row's "
            "first stage; mean visual tokens in LLM: averaged over the decoder layers (a method inside the LLM "
            "keeps all tokens up to its layer). Change vs baseline: accuracy minus the unpruned model's accuracy. "
            "Prefill GFLOPs: analytic FLOPs of one prefill of one sequence (vision tower, projector, LLM, LM head); "
            "FLOPs ratio: that total over the baseline's. TTFT (time to first token, image encoding and pruning "
            "included) and decode time per further token: medians over a few samples timed one at a time on this "
            "machine, with their interquartile range in brackets; a range wider than "
            f"{NOISY_SPREAD:.0%} of the median is flagged as noisy. KV cache: bf16 keys and values after one "
            "prefill, from the tokens each layer keeps."),
        *_matched_section(rows),
        Heading("Accuracy per question family"),
        Table(["method", "site", "budget", *names], per_family),
        Heading("Figures"),
        Picture("accuracy vs visual tokens kept", ACCURACY_PLOT),
        Paragraph("Accuracy against the visual tokens each row keeps after its first stage (log axis), bars at "
                  "95% Wilson intervals; the black point, dashed line and grey band are the unpruned model. "
                  "Points that would overlap are moved sideways a little, and budgets of one method that land on "
                  "the same point are named beside it."),
        Picture("accuracy vs prefill FLOPs", COST_PLOT),
        Paragraph("The same accuracies against prefill cost: up and to the left is better, wherever a method cuts "
                  "its tokens (one that cuts inside the LLM pays for its first layers on every token)."),
        Picture("tokens entering each LLM decoder layer", LAYERS_PLOT),
        Heading("Tokens per LLM layer"),
        Table(["method", "site", "budget", "tokens entering each layer (layers)"],
              [[r["method"], r["site"] or MISSING, r["budget"], layer_runs(r["tokens_per_llm_layer"])] for r in rows]),
        *_paired_section(rows),
        *_paired_at_cost_section(rows),
        *_gallery_section(rows, gallery),
    ]


def _paired_section(rows: list[dict]) -> list[Block]:
    """Blocks comparing each two-stage row with the other methods at its budget (none when no
    row has ``paired``)."""
    table = [[r["budget"], f"{r['accuracy']:.3f}", p["against"], f"{p['accuracy']:.3f}", f"{p['difference']:+.3f}",
              p["better"], p["worse"], f"{p['p_value']:.3g}"]
             for r in rows for p in r.get("paired", [])]
    if not table:
        return []
    return [Heading("The two-stage pruner against each method at its budget"),
            Table(["budget", "two_stage", "against", "its accuracy", "difference", "items better", "items worse",
                   "p (sign test)"], table),
            Paragraph("Every row answers the same items, so the comparison is paired: items better / worse count the "
                      "items the two-stage pruner scored higher / lower than the other method, and p is the exact "
                      "two-sided sign test on them (McNemar's test for right/wrong answers). A small p says the "
                      "difference is more than these samples' noise.")]


def _matched_section(rows: list[dict]) -> list[Block]:
    """Blocks saying which budget each matched row got and the cost it was matched to (none when
    no row was matched: ``eval --match``)."""
    matched = [r for r in rows if "matched" in r]
    if not matched:
        return []
    by = matched[0]["matched"]["by"]

    def measured(r):
        return _number(r["visual_tokens_mean_llm"], 1) if by == "tokens" else format_gflops(r["flops"]["total"])

    def planned(value):
        return _number(value, 1) if by == "tokens" else format_gflops(value)

    table = [[r["method"], r["site"], r["matched"]["to"], r["budget"], planned(r["matched"]["target"]),
              planned(r["matched"]["planned"]), measured(r)] for r in matched]
    what = "mean visual tokens in LLM" if by == "tokens" else "prefill GFLOPs"
    return [Heading("Budgets matched at equal cost"),
            Table(["method", "site", "matched to", "budget given", f"target {what}", f"planned {what}",
                   f"measured {what}"], table),
            Paragraph(f"Each method's budget (a token count at its site) is the one whose {what}, planned from the "
                      "budgets alone, is nearest the target: the two-stage pruner's measured value at the budget in "
                      "'matched to' when it is evaluated, else that budget itself. Rows matched to the same budget "
                      "are compared in the paired tests.")]


def _paired_at_cost_section(rows: list[dict]) -> list[Block]:
    """Blocks comparing each method's row with the two-stage row that costs no more (none when no
    row has ``two_stage_at_cost``)."""
    table = []
    for r in rows:
        if "two_stage_at_cost" not in r:
            continue
        ours = r["two_stage_at_cost"]
        theirs = [f"{r['method']}@{r['site']}", r["budget"], f"{r['flops_ratio']:.3f}", f"{r['accuracy']:.3f}"]
        if ours is None:
            table.append([*theirs, *[MISSING] * 7])
            continue
        table.append([*theirs, ours["budget"], f"{ours['flops_ratio']:.3f}", f"{ours['accuracy']:.3f}",
                      f"{ours['difference']:+.3f}", ours["better"], ours["worse"], f"{ours['p_value']:.3g}"])
    if not table:
        return []
    return [Heading("The two-stage pruner against each method at no more prefill cost"),
            Table(["method", "budget", "FLOPs ratio", "accuracy", "two_stage budget", "its FLOPs ratio", "its accuracy",
                   "difference", "items better", "items worse", "p (sign test)"], table),
            Paragraph("A budget counts visual tokens where a method cuts them: entering the LLM, or after an LLM layer "
                      "(a method there runs its first layers on every token). So each method's row is also compared "
                      "with the two-stage row of the most prefill FLOPs that still costs no more, on the same items "
                      "and with the same sign test; — where every two-stage row costs more.")]


def _gallery_section(rows: list[dict], gallery: Sequence[str]) -> list[Block]:
    """The kept-token pictures of the items ``gallery`` and a table of every row's answers on them."""
    if not gallery:
        return []
    answers = []
    for r in rows:
        examples = r["examples"]
        cells = [f"{prediction} {verdict(score)[0]}" for prediction, score in zip(examples["predictions"],
                                                                                  examples["scores"])]
        answers.append([r["method"], r["site"] or MISSING, r["budget"], *cells])
    return [Heading("Kept tokens and answers on the same items"),
            Paragraph("Each picture is one item as the vision tower sees it (the processor's resized and cropped "
                      "pixels): the unpruned model top left, then a row per method and a column per budget. Patches "
                      "a row dropped are faded towards white (half as much where an earlier stage kept them and a "
                      "later one dropped them; a merging method's kept tokens hold the merged ones). Each panel "
                      "gives the answer and whether it was right (green ✓), wrong (red ✗) or partly right (≈, a "
                      "VQA soft score)."),
            *(Picture(f"kept tokens and answers on item {qid}", gallery_file(qid)) for qid in gallery),
            Table(["method", "site", "budget", *(f"item {qid}" for qid in gallery)], answers)]


def _check_gallery(rows: list[dict], examples: Sequence[Example] | None, patch_grid: int | None) -> list[str]:
    """The question ids to picture (none when no row has ``examples``), once the rows and
    ``examples`` are known to hold everything the gallery draws."""
    if not any("examples" in r or "kept_tokens" in r for r in rows):
        return []
    if not all("examples" in r for r in rows):
        raise TokensieveError("some report rows have kept_tokens or examples and others lack examples (their "
                              "answers on the pictured items): give them to every row or to none")
    if examples is None or (patch_grid is None and any(e.grid is None for e in examples)):
        raise TokensieveError("rows carry answers on pictured items: give examples and patch_grid to draw them")
    ids = rows[0]["examples"]["ids"]
    have = {e.question_id for e in examples}
    missing = [qid for qid in ids if qid not in have]
    if missing:
        raise TokensieveError(f"no example image for pictured item(s) {', '.join(map(str, missing))}")
    for r in rows:
        if r["examples"]["ids"] != ids or ("kept_tokens" in r and r["kept_tokens"]["ids"] != ids):
            raise TokensieveError(f"report row {row_label(r)} pictures other items than the baseline ({ids})")
        if r["method"] != BASELINE and "kept_tokens" not in r:
            raise TokensieveError(f"report row {row_label(r)} has answers on the pictured items but no kept_tokens")
    return ids


def write_report(rows: list[dict], meta: dict, out_dir: Path, examples: Sequence[Example] | None = None,
                 patch_grid: int | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html``, the three figures and, for rows with
    ``examples`` (answers on pictured items) and ``kept_tokens``, one gallery picture per item
    into ``out_dir`` (created if needed); return their paths by name (relative to ``out_dir``).
    Rows and meta are checked first, so bad input writes nothing.

    examples: the pictured items (:func:`~tokensieve.evaluate.kept_overlays.example_views`), their
    images on a ``patch_grid`` x ``patch_grid`` grid of patches, or each on its own ``grid`` (Qwen-VL).
    """
    check_rows(rows)
    gallery = _check_gallery(rows, examples, patch_grid)
    if not isinstance(meta, dict):
        raise TokensieveError(f"report meta must be a dict, not a {type(meta).__name__}")
    try:
        report_json = json.dumps({"meta": meta, "rows": rows}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    except TypeError as e:
        raise TokensieveError(f"the report cannot be written as JSON: {e}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["report.json", "report.md", "report.html", ACCURACY_PLOT, COST_PLOT, LAYERS_PLOT,
             *map(gallery_file, gallery)]
    paths = {name: out_dir / name for name in names}
    plot_accuracy_vs_tokens(rows, meta, paths[ACCURACY_PLOT])
    plot_accuracy_vs_flops(rows, meta, paths[COST_PLOT])
    plot_tokens_per_layer(rows, meta, paths[LAYERS_PLOT])
    by_id = {e.question_id: e for e in examples or ()}
    for qid in gallery:
        plot_gallery(rows, by_id[qid], patch_grid, meta, paths[gallery_file(qid)])
    blocks = report_blocks(rows, meta, gallery)
    # atomic and fsynced: an interrupted write leaves the previous report, never half of one
    atomic_write_text(paths["report.md"], to_markdown(blocks))
    atomic_write_text(paths["report.html"], to_html(blocks, out_dir, "tokensieve eval report"))
    atomic_write_text(paths["report.json"], report_json)
    return paths


def load_report(out_dir: Path) -> dict:
    """``{"meta": ..., "rows": ...}`` as :func:`write_report` wrote it to ``out_dir/report.json``."""
    path = Path(out_dir) / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokensieveError(f"{path} does not exist: write the report first (tokensieve eval --out)") from None
    except json.JSONDecodeError as e:
        raise TokensieveError(f"{path} is not valid JSON: {e}") from None
