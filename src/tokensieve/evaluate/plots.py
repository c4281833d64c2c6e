"""The eval report's figures: accuracy against visual tokens and against prefill cost (with 95%
intervals), and the tokens entering each LLM layer as one small panel per method.

Every method keeps one colour (Okabe-Ito, told apart with colour-blind vision), one marker and
one line style in every figure; markers are hollow and points that would fall on each other are
moved sideways by a few points, so none hides another. Titles name the model, the mode and n.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, StrMethodFormatter

# Okabe & Ito's palette without black (kept for the unpruned model); yellow last, as it is faint on white.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h")
LINESTYLES = ("-", "--", ":")  # a method past the palette's length keeps its colour apart by the line
BASELINE = "none"
MARKER_PT = 7.0  # marker size
DODGE_PT = 9.0  # sideways step between points (with their error bars) that would overlap


def method_styles(rows: list[dict]) -> dict[str, dict]:
    """``{method: {"color", "marker", "linestyle"}}`` for the pruned rows' methods in first-seen
    order: every method differs from every other in colour, marker or both."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != BASELINE))
    return {m: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[i // len(PALETTE) % len(LINESTYLES)]} for i, m in enumerate(methods)}


def method_label(row: dict) -> str:
    """``fastv @ llm.2``: a method and where it cuts."""
    return row["method"] if row["site"] is None else f"{row['method']} @ {row['site']}"


def subtitle(meta: dict, rows: list[dict]) -> str:
    """``model · mode mode · n = N items``: what every figure of the report measured."""
    sizes = sorted({r["n"] for r in rows})
    return f"{meta.get('model', 'model ?')} · {meta.get('mode', '?')} mode · n = {', '.join(map(str, sizes))} items"


def save_png(fig: Figure, path: Path, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG through the Agg canvas (no pyplot, no window)."""
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    """The pruned rows grouped by method, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] != BASELINE:
            groups.setdefault(row["method"], []).append(row)
    return groups


def dodge_offsets(spans: list[tuple[float, float, float]], tol: float) -> list[float]:
    """A sideways offset (in steps of ``tol``) per point: 0 for a point alone, and ``-0.5, 0.5`` /
    ``-1, 0, 1`` ... across a cluster of points less than ``tol`` apart sideways whose vertical
    spans (error bars, widened by ``tol / 2``) overlap a neighbour's (single linkage, in input
    order). spans: ``(x, y_low, y_high)`` per point, on the page (pixels)."""
    parent = list(range(len(spans)))  # union-find

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, (xi, lo_i, hi_i) in enumerate(spans):
        for j, (xj, lo_j, hi_j) in enumerate(spans[:i]):
            if abs(xi - xj) < tol and lo_i - tol / 2 < hi_j + tol / 2 and lo_j - tol / 2 < hi_i + tol / 2:
                parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(spans)):
        members.setdefault(root(i), []).append(i)
    offsets = [0.0] * len(spans)
    for group in members.values():
        for k, i in enumerate(group):
            offsets[i] = k - (len(group) - 1) / 2
    return offsets


def accuracy_limits(rows: list[dict]) -> tuple[float, float]:
    """A y range holding every interval: from the lowest ``lo`` rounded down to 0.05, to just over 1."""
    lowest = min(r["accuracy_ci95"][0] for r in rows)
    return max(0.0, math.floor((lowest - 0.02) * 20) / 20), 1.02


def plot_accuracy(rows: list[dict], meta: dict, path: Path, x_of: Callable[[dict], float], x_label: str,
                  title: str, tokens: bool) -> Figure:
    """Accuracy with its 95% interval against ``x_of(row)``, one hollow-marker line per method,
    the unpruned model as a black point, a dashed line and a grey band (its interval).

    tokens: ``x`` counts tokens: a log axis (budgets are ratios of each other) ticked at the
    counts measured, as integers. Points that would hide each other are nudged apart sideways,
    and a method's points that coincide (the oracle keeps 16 tokens at two budgets) are
    labelled with their budgets."""
    fig = Figure(figsize=(8.5, 5))
    ax = fig.add_subplot()
    base = rows[0]
    xs = [x_of(r) for r in rows]
    if tokens:
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
        ax.xaxis.set_major_locator(FixedLocator(_spread_ticks(sorted({round(x) for x in xs}))))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.set_xlim(max(0.0, math.floor(min(xs) * 10) / 10 - 0.05), max(xs) + 0.05)
    ax.set_ylim(*accuracy_limits(rows))
    ax.axhspan(*base["accuracy_ci95"], color="0.88", zorder=0)
    ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1, zorder=1)
    ax.errorbar([x_of(base)], [base["accuracy"]], yerr=_bars([base]), color="black", marker="o", markersize=MARKER_PT,
                capsize=3, linestyle="none", label=f"unpruned: {base['accuracy']:.3f}", zorder=4)
    # Limits and scale are set, so data maps to the page: which points (with their bars) would overlap.
    low = ax.transData.transform([(x_of(r), r["accuracy_ci95"][0]) for r in rows[1:]])
    high = ax.transData.transform([(x_of(r), r["accuracy_ci95"][1]) for r in rows[1:]])
    spans = [(lo[0], lo[1], hi[1]) for lo, hi in zip(low, high)]
    step = DODGE_PT * fig.dpi / 72
    moved = ax.transData.inverted().transform([(x + step * k, y) for (x, y), k in
                                               zip(low, dodge_offsets(spans, step))])
    plotted_x = {id(row): x for row, (x, _) in zip(rows[1:], moved)}  # where each row's marker goes
    if plotted_x:  # room for the points moved furthest out
        low_x, high_x = ax.get_xlim()
        ax.set_xlim(min(low_x, min(plotted_x.values()) / 1.08 if tokens else min(plotted_x.values()) - 0.02),
                    max(high_x, max(plotted_x.values()) * 1.08 if tokens else max(plotted_x.values()) + 0.02))
    styles = method_styles(rows)
    for method, group in by_method(rows).items():
        style = styles[method]
        group = sorted(group, key=x_of)
        ax.errorbar([plotted_x[id(r)] for r in group], [r["accuracy"] for r in group], yerr=_bars(group),
                    color=style["color"], linestyle=style["linestyle"], linewidth=1.2, marker=style["marker"],
                    markersize=MARKER_PT, markerfacecolor="white", markeredgewidth=1.6, capsize=2.5, elinewidth=1,
                    zorder=3, label=method_label(group[0]))
        for (x, y), budgets in _coinciding(group, x_of).items():
            ax.annotate(f"budget {' = '.join(budgets)}", (x, y), xytext=(10, -14), textcoords="offset points",
                        fontsize=7, color=style["color"], zorder=5,
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (bars: 95% Wilson interval)")
    ax.set_title(f"{title}\n{subtitle(meta, rows)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    save_png(fig, path)
    return fig


def _spread_ticks(values: list[int], min_ratio: float = 1.12) -> list[int]:
    """``values`` (ascending, positive) without those closer than ``min_ratio`` to the previous
    tick kept, so labels on a log axis do not run into each other; the largest is always kept."""
    ticks: list[int] = []
    for v in values:
        if ticks and v < ticks[-1] * min_ratio:
            if v != values[-1]:
                continue
            ticks.pop()
        ticks.append(v)
    return ticks


def _bars(rows: list[dict]) -> list[list[float]]:
    """Error bar lengths below and above each row's accuracy, from its ``accuracy_ci95``."""
    return [[r["accuracy"] - r["accuracy_ci95"][0] for r in rows],
            [r["accuracy_ci95"][1] - r["accuracy"] for r in rows]]


def _coinciding(group: list[dict], x_of: Callable[[dict], float]) -> dict[tuple[float, float], list[str]]:
    """``{(x, accuracy): [budgets]}`` for the places two or more of one method's rows share."""
    at: dict[tuple[float, float], list[str]] = {}
    for row in group:
        at.setdefault((x_of(row), row["accuracy"]), []).append(str(row["budget"]))
    return {point: budgets for point, budgets in at.items() if len(budgets) > 1}


def plot_accuracy_vs_tokens(rows: list[dict], meta: dict, path: Path) -> Figure:
    """Accuracy against visual tokens kept (after each row's first stage), one line per method."""
    return plot_accuracy(rows, meta, path, lambda r: r["visual_tokens_kept"],
                         f"visual tokens kept (of {rows[0]['visual_tokens_kept']}, log scale)",
                         "Accuracy vs visual tokens kept", tokens=True)


def plot_accuracy_vs_flops(rows: list[dict], meta: dict, path: Path) -> Figure:
    """Accuracy against the prefill FLOPs ratio, one line per method: up and to the left is
    better, wherever each method cuts its tokens."""
    return plot_accuracy(rows, meta, path, lambda r: r["flops_ratio"], "prefill FLOPs / unpruned prefill FLOPs",
                         "Accuracy vs prefill cost", tokens=False)


def plot_tokens_per_layer(rows: list[dict], meta: dict, path: Path) -> Figure:
    """Tokens (visual + text) entering each LLM decoder layer: one panel per method, a line per
    budget (budgets with the same counts share a line and a label), the unpruned model dashed
    in every panel; integer axes."""
    groups = by_method(rows)
    styles = method_styles(rows)
    cols = min(4, max(1, len(groups)))
    grid_rows = max(1, math.ceil(len(groups) / cols))
    fig = Figure(figsize=(2.9 * cols, 2.3 * grid_rows + 0.6), layout="constrained")
    axes = fig.subplots(grid_rows, cols, sharex=True, sharey=True, squeeze=False)
    base = rows[0]["tokens_per_llm_layer"]
    edges = [k - 0.5 for k in range(len(base) + 1)]  # layer k centred on x = k
    for ax, (method, group) in zip(axes.flat, groups.items()):
        ax.stairs(base, edges, baseline=None, color="black", linestyle="--", linewidth=1)
        lines: dict[tuple[int, ...], list[str]] = {}
        for row in group:
            lines.setdefault(tuple(row["tokens_per_llm_layer"]), []).append(str(row["budget"]))
        for k, (counts, budgets) in enumerate(lines.items()):
            ax.stairs(counts, edges, baseline=None, color=styles[method]["color"],
                      linestyle=LINESTYLES[k % len(LINESTYLES)], linewidth=1.8, label=f"budget {' = '.join(budgets)}")
        ax.set_title(method_label(group[0]), fontsize=9)
        ax.legend(fontsize=6.5, loc="upper right", frameon=False)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_tick_params(labelbottom=True)  # also under a panel with none below it
        ax.set_ylim(0, max(base) * 1.45)  # room for the legend above the unpruned line
    fig.supxlabel("LLM decoder layer", fontsize=9)
    fig.supylabel("tokens entering the layer (visual + text)", fontsize=9)
    fig.suptitle(f"Tokens per LLM decoder layer (dashed: unpruned)\n{subtitle(meta, rows)}", fontsize=10)
    save_png(fig, path)
    return fig
