"""A report of ``tokensieve eval``: the rows of :func:`~tokensieve.evaluate.accuracy.compare_methods`
as JSON, a Markdown summary, three plots (accuracy vs visual tokens and vs prefill FLOPs, tokens
per LLM layer), and for rows that carry ``kept_tokens``, a picture per row of the tokens each
stage kept."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tokensieve.errors import TokensieveError
from tokensieve.evaluate.kept_overlays import overlay_file, plot_kept_tokens

ROW_KEYS = ("method", "site", "keep", "visual_tokens_kept", "accuracy", "per_family", "flops", "flops_ratio",
            "tokens_per_llm_layer")
BASELINE_METHOD = "none"
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
    if rows[0]["method"] != BASELINE_METHOD:
        raise TokensieveError(f"the first report row must be the unpruned baseline (method {BASELINE_METHOD!r}), "
                              f"not {rows[0]['method']!r}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; cells are ``str``-ed and ``|`` in them is escaped."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def format_gflops(flops: int) -> str:
    """``flops`` in GFLOPs to 3 significant digits, never in exponent notation (``8440``, ``0.0123``)."""
    return format(Decimal(f"{flops / 1e9:.3g}"), ",f")


def format_change(accuracy: float, baseline: float) -> str:
    """``accuracy - baseline`` with a sign and 3 decimals (``+0.012``, ``-0.250``)."""
    return f"{accuracy - baseline:+.3f}"


def row_label(row: dict) -> str:
    """``method keep=...`` for a pruned row, ``none (baseline)`` for the unpruned one."""
    return f"{row['method']} (baseline)" if row["method"] == BASELINE_METHOD else f"{row['method']} keep={row['keep']}"


def families(rows: list[dict]) -> list[str]:
    """Question families over all rows: the baseline's order, then any the baseline lacks."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row["per_family"]))
    return list(names)


def _number(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def render_markdown(rows: list[dict], meta: dict) -> str:
    """The Markdown report: meta, main table, per-family table, the plots and the paired comparisons."""
    base = rows[0]["accuracy"]
    main = [[r["method"], r["site"] or MISSING, r["keep"], r["visual_tokens_kept"],
             _number(r.get("visual_tokens_mean_llm"), 1), f"{r['accuracy']:.3f}",
             MISSING if i == 0 else format_change(r["accuracy"], base), format_gflops(r["flops"]["total"]),
             f"{r['flops_ratio']:.3f}", _number(r.get("ttft_ms")), _number(r.get("decode_ms_per_token")),
             _number(None if r.get("kv_cache_bytes") is None else r["kv_cache_bytes"] / 1024, 1)]
            for i, r in enumerate(rows)]
    names = families(rows)
    per_family = [[r["method"], r["site"] or MISSING, r["keep"],
                   *(f"{r['per_family'][f]:.3f}" if f in r["per_family"] else MISSING for f in names)] for r in rows]
    return "\n".join([
        "# tokensieve eval report", "",
        *(f"- **{key}**: {value}" for key, value in meta.items()), "",
        "## Accuracy and prefill cost", "",
        markdown_table(["method", "site", "keep", "visual tokens kept", "mean visual tokens in LLM", "accuracy",
                        "change vs baseline", "prefill GFLOPs", "FLOPs ratio", "TTFT ms", "decode ms/token",
                        "KV cache KiB"], main), "",
        "Visual tokens kept: after the row's first stage; mean visual tokens in LLM: averaged over the decoder "
        "layers (a method inside the LLM keeps all tokens up to its layer). "
        "Change vs baseline: accuracy minus the unpruned model's accuracy. Prefill GFLOPs: analytic FLOPs of one "
        "prefill of one sequence (vision tower, projector, LLM, LM head); FLOPs ratio: that total over the "
        "baseline's. TTFT (time to first token, image encoding and pruning included) and decode time per further "
        "token: measured medians over a few samples, one at a time, on this machine. KV cache: bf16 keys and "
        "values after one prefill, from the tokens each layer keeps.", "",
        "## Accuracy per question family", "",
        markdown_table(["method", "site", "keep", *names], per_family), "",
        "## Plots", "",
        f"![accuracy vs visual tokens kept]({ACCURACY_PLOT})", "",
        f"![accuracy vs prefill FLOPs]({COST_PLOT})", "",
        f"![tokens entering each LLM decoder layer]({LAYERS_PLOT})", "",
        *_paired_section(rows),
        *_paired_at_cost_section(rows),
        *_kept_section(rows),
    ])


def _paired_section(rows: list[dict]) -> list[str]:
    """Markdown lines comparing each two-stage row with the other methods at its budget (none
    when no row has ``paired``)."""
    table = [[r["keep"], f"{r['accuracy']:.3f}", p["against"], f"{p['accuracy']:.3f}", f"{p['difference']:+.3f}",
              p["better"], p["worse"], f"{p['p_value']:.3g}"]
             for r in rows for p in r.get("paired", [])]
    if not table:
        return []
    return ["## The two-stage pruner against each method at its budget", "",
            markdown_table(["keep", "two_stage", "against", "its accuracy", "difference", "items better",
                            "items worse", "p (sign test)"], table), "",
            "Every row answers the same items, so the comparison is paired: items better / worse count the "
            "items the two-stage pruner scored higher / lower than the other method, and p is the exact "
            "two-sided sign test on them (McNemar's test for right/wrong answers). A small p says the "
            "difference is more than these samples' noise.", ""]


def _paired_at_cost_section(rows: list[dict]) -> list[str]:
    """Markdown lines comparing each method's row with the two-stage row that costs no more
    (none when no row has ``two_stage_at_cost``)."""
    table = []
    for r in rows:
        if "two_stage_at_cost" not in r:
            continue
        ours = r["two_stage_at_cost"]
        theirs = [f"{r['method']}@{r['site']}", r["keep"], f"{r['flops_ratio']:.3f}", f"{r['accuracy']:.3f}"]
        if ours is None:
            table.append([*theirs, *[MISSING] * 7])
            continue
        table.append([*theirs, ours["keep"], f"{ours['flops_ratio']:.3f}", f"{ours['accuracy']:.3f}",
                      f"{ours['difference']:+.3f}", ours["better"], ours["worse"], f"{ours['p_value']:.3g}"])
    if not table:
        return []
    return ["## The two-stage pruner against each method at no more prefill cost", "",
            markdown_table(["method", "keep", "FLOPs ratio", "accuracy", "two_stage keep", "its FLOPs ratio",
                            "its accuracy", "difference", "items better", "items worse", "p (sign test)"], table), "",
            "A budget counts visual tokens where a method cuts them: entering the LLM, or after an LLM layer "
            "(a method there runs its first layers on every token). So each method's row is also compared with "
            "the two-stage row of the most prefill FLOPs that still costs no more, on the same items and with "
            "the same sign test; — where every two-stage row costs more.", ""]


def _kept_section(rows: list[dict]) -> list[str]:
    """Markdown lines linking each row's kept-token picture (none when no row has one)."""
    pictured = [r for r in rows if "kept_tokens" in r]
    if not pictured:
        return []
    return ["## Kept tokens", "",
            "The first samples' images as the vision tower sees them, with the patches each stage kept bright "
            "and the dropped ones dimmed (a merging method's kept tokens hold the merged ones).", "",
            *(f"- [{row_label(r)}]({overlay_file(r)})" for r in pictured), ""]


def _save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG through the Agg canvas (no pyplot, no window)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _methods(rows: list[dict]) -> dict[str, list[dict]]:
    """The pruned rows grouped by method, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in rows[1:]:
        groups.setdefault(row["method"], []).append(row)
    return groups


def _colour(i: int):
    """Method ``i``'s colour: tab20 keeps 11+ methods apart (the default cycle repeats after 10)."""
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)


def _plot_accuracy(rows: list[dict], path: Path, x_key: str, x_label: str, title: str) -> None:
    """Accuracy against ``row[x_key]``, one line per method, the baseline as a dashed reference."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    base = rows[0]
    ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1,
               label=f"no pruning ({base['visual_tokens_kept']} tokens): {base['accuracy']:.3f}")
    for i, (method, group) in enumerate(_methods(rows).items()):
        group = sorted(group, key=lambda r: r[x_key])
        ax.plot([r[x_key] for r in group], [r["accuracy"] for r in group], marker="os^Dv"[i % 5],
                color=_colour(i), label=method)
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_accuracy_vs_tokens(rows: list[dict], path: Path) -> None:
    """Accuracy against visual tokens kept, one line per method."""
    _plot_accuracy(rows, path, "visual_tokens_kept", "visual tokens kept", "Accuracy vs visual tokens kept")


def plot_accuracy_vs_flops(rows: list[dict], path: Path) -> None:
    """Accuracy against the prefill FLOPs ratio, one line per method: up and to the left is
    better, wherever each method cuts its tokens."""
    _plot_accuracy(rows, path, "flops_ratio", "prefill FLOPs / unpruned prefill FLOPs", "Accuracy vs prefill cost")


def _layer_edges(counts: list[int]) -> list[float]:
    """Step edges that centre decoder layer ``k`` on ``x = k``."""
    return [k - 0.5 for k in range(len(counts) + 1)]


def plot_tokens_per_layer(rows: list[dict], path: Path) -> None:
    """Tokens (visual + text) entering each LLM decoder layer, one step line per row, baseline dashed
    on top; a colour per method, a line style per budget."""
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    base = rows[0]["tokens_per_llm_layer"]
    ax.stairs(base, _layer_edges(base), baseline=None, color="black", linestyle="--", linewidth=1.5, zorder=3,
              label=row_label(rows[0]))
    styles = ["-", "--", ":", "-."]
    for colour, group in enumerate(_methods(rows).values()):
        for i, row in enumerate(group):
            counts = row["tokens_per_llm_layer"]
            ax.stairs(counts, _layer_edges(counts), baseline=None, color=_colour(colour),
                      linestyle=styles[i % len(styles)], linewidth=1.5, label=row_label(row))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("LLM decoder layer")
    ax.set_ylabel("tokens entering the layer (visual + text)")
    ax.set_title("Tokens per LLM decoder layer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def write_report(rows: list[dict], meta: dict, out_dir: Path, example_images: dict | None = None,
                 patch_grid: int | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the three plots into ``out_dir`` (created if needed);
    return their paths by file name. Rows and meta are checked first, so bad input writes nothing.

    example_images: ``{question_id: (S, S, 3) uint8}`` model views (see
    :func:`~tokensieve.evaluate.kept_overlays.model_views`) of the items in rows' ``kept_tokens``,
    on a ``patch_grid`` x ``patch_grid`` grid: each such row's picture is written too.
    """
    check_rows(rows)
    pictured = [r for r in rows if "kept_tokens" in r]
    if pictured and (example_images is None or patch_grid is None):
        raise TokensieveError("rows carry kept_tokens: give example_images and patch_grid to draw them")
    if not isinstance(meta, dict):
        raise TokensieveError(f"report meta must be a dict, not a {type(meta).__name__}")
    try:
        report_json = json.dumps({"meta": meta, "rows": rows}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    except TypeError as e:
        raise TokensieveError(f"the report cannot be written as JSON: {e}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("report.json", "report.md", ACCURACY_PLOT, COST_PLOT, LAYERS_PLOT)}
    plot_accuracy_vs_tokens(rows, paths[ACCURACY_PLOT])
    plot_accuracy_vs_flops(rows, paths[COST_PLOT])
    plot_tokens_per_layer(rows, paths[LAYERS_PLOT])
    for row in pictured:
        paths[overlay_file(row)] = out_dir / overlay_file(row)
        plot_kept_tokens(row, example_images, patch_grid, paths[overlay_file(row)])
    paths["report.md"].write_text(render_markdown(rows, meta), encoding="utf-8")
    paths["report.json"].write_text(report_json, encoding="utf-8")
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
