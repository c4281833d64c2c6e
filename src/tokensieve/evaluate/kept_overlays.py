"""The kept-token gallery: for each pictured item, what every method kept at every budget and
what it answered, side by side on the same image.

The image drawn is the model's own view (the processor's resized, cropped pixels, with its
normalisation undone), so patch ``p`` of an ``n x n`` grid is exactly the square at row
``p // n``, column ``p % n``. On Qwen-VL each image has its own grid of merged tokens
(``rows x cols``, dynamic resolution): its view is the image at the processor's size, token ``p``
the cell at row ``p // cols``, column ``p % cols``. A patch the method dropped is faded towards white (a patch an
earlier stage kept and a later one dropped, half as much); a merging method's kept tokens are
the survivors that absorbed the others.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.backbones.load import is_qwen
from tokensieve.evaluate.plots import BASELINE, by_method, method_label, save_png, subtitle
from tokensieve.evaluate.qwen_costs import image_grids

FOLDER = "kept_tokens"
FADE = 0.75  # how far towards white a patch every stage dropped is drawn
RIGHT, WRONG, PARTLY = "#009E73", "#D55E00", "#E69F00"  # Okabe-Ito green, vermillion, orange
PREDICTION_CHARS = 22  # a longer answer is cut in the picture (samples.jsonl has it whole)


@dataclass(frozen=True)
class Example:
    """A pictured item. image: ``(H, W, 3)`` uint8, the item's image as the vision tower sees it;
    grid: its ``(rows, cols)`` of visual tokens where each image has its own (Qwen-VL), else None
    (the report's square patch grid)."""

    question_id: str
    question: str
    answers: list[str]
    image: np.ndarray
    grid: tuple[int, int] | None = None


def gallery_file(question_id: str) -> str:
    """``kept_tokens/item_<id>.png``: where an item's gallery goes, relative to the report."""
    return f"{FOLDER}/item_{re.sub(r'[^A-Za-z0-9._]+', '-', str(question_id))}.png"


def example_views(backbone: LlavaBackbone | QwenVLBackbone, items: list) -> list[Example]:
    """Each item (``question_id``, ``question``, ``answers``, ``image``) with its model view."""
    if is_qwen(backbone):
        return [_qwen_view(backbone, item, grid) for item, grid in zip(items, image_grids(backbone, items))]
    processor = backbone.processor.image_processor
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    examples = []
    for item in items:
        pixels = processor(images=[item.image], return_tensors="np")["pixel_values"][0]  # (3, S, S)
        view = np.clip((pixels * std + mean) * 255, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
        examples.append(Example(item.question_id, item.question, list(item.answers), view))
    return examples


def _qwen_view(backbone: QwenVLBackbone, item, grid_thw: tuple[int, int, int]) -> Example:
    """``item`` at the size the processor resizes it to (patch grid ``grid_thw``), with its merged-token grid."""
    _, h, w = grid_thw
    patch, merge = backbone.config.vision_config.patch_size, backbone.config.vision_config.spatial_merge_size
    image = item.image if isinstance(item.image, Image.Image) else Image.fromarray(np.asarray(item.image))
    view = np.asarray(image.convert("RGB").resize((w * patch, h * patch), Image.Resampling.BICUBIC))
    return Example(item.question_id, item.question, list(item.answers), view, (h // merge, w // merge))


def fade_dropped(image: np.ndarray, stages: list[list[int]], grid: int | tuple[int, int]) -> np.ndarray:
    """``image`` ``(H, W, 3)`` uint8 with each of its ``grid x grid`` (or ``rows x cols``) patches faded
    towards white by ``FADE`` times the share of ``stages`` that dropped it. stages: the patch indices
    each stage kept, in order (-1, CLS, and -2, padding, have no square); none: the image unchanged."""
    if not stages:
        return image
    rows, cols = grid if isinstance(grid, tuple) else (grid, grid)
    kept_by = np.zeros(rows * cols)
    for kept in stages:
        kept_by[[p for p in kept if p >= 0]] += 1
    fade = (FADE * (1 - kept_by / len(stages))).reshape(rows, cols)
    row = np.arange(image.shape[0]) * rows // image.shape[0]  # the patch row of each pixel row
    col = np.arange(image.shape[1]) * cols // image.shape[1]  # the patch column of each pixel column
    fade = fade[row][:, col][..., None]
    return (image + (255 - image.astype(float)) * fade).round().astype(np.uint8)


def gold_text(answers: list[str], most: int = 3) -> str:
    """The reference answers, most frequent first, with how many gave each when annotators voted."""
    counts = Counter(answers).most_common()
    voted = len(counts) < len(answers)
    shown = [f"{a} ({n})" if voted else a for a, n in counts[:most]]
    return " / ".join(shown) + (" / …" if len(counts) > most else "")


def verdict(score: float) -> tuple[str, str]:
    """``(mark, colour)`` of an answer's score: right (1), wrong (0), or partly right (a VQA soft score)."""
    if score >= 1:
        return "✓ right", RIGHT
    if score <= 0:
        return "✗ wrong", WRONG
    return f"≈ {score:.2f}", PARTLY


def _answer_of(row: dict, question_id: str) -> tuple[str, float]:
    """``(prediction, score)`` of ``row`` on the pictured item ``question_id``."""
    examples = row["examples"]
    i = examples["ids"].index(question_id)
    return examples["predictions"][i], examples["scores"][i]


def _draw(ax, image: np.ndarray, heading: str, prediction: str, score: float) -> None:
    """One panel: the picture, ``heading`` over the prediction and its mark, a frame in the mark's colour."""
    mark, colour = verdict(score)
    shown = prediction if len(prediction) <= PREDICTION_CHARS else prediction[:PREDICTION_CHARS - 1] + "…"
    ax.imshow(image)
    ax.set_title(f"{heading}\n“{shown}” {mark}", fontsize=7, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2)


def plot_gallery(rows: list[dict], example: Example, grid: int | None, meta: dict, path: Path) -> Figure:
    """``example`` as every row saw it: the unpruned model top left, then one row of panels per
    method and one column per budget, each with the patches it kept, its answer and whether
    that was right. rows: the report's rows, each with ``examples`` (answers on the pictured
    items) and every pruned one with ``kept_tokens``."""
    qid = example.question_id
    groups = by_method(rows)
    budgets = list(dict.fromkeys(str(r["budget"]) for r in rows if r["method"] != BASELINE))
    n_rows, n_cols = max(1, len(groups)), 1 + len(budgets)
    fig = Figure(figsize=(1.75 * n_cols, 1.95 * n_rows + 0.9), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    base = rows[0]
    axes[0][0].set_axis_on()
    _draw(axes[0][0], example.image, f"unpruned · {base['visual_tokens_kept']} tokens", *_answer_of(base, qid))
    for r, (method, group) in enumerate(groups.items()):
        for row in group:
            ax = axes[r][1 + budgets.index(str(row["budget"]))]
            ax.set_axis_on()
            kept = row["kept_tokens"]
            stages = [per_item[kept["ids"].index(qid)] for per_item in kept["stages"].values()]
            count = sum(p >= 0 for p in stages[-1])
            _draw(ax, fade_dropped(example.image, stages, example.grid or grid), f"budget {row['budget']} · {count} tokens",
                  *_answer_of(row, qid))
        first = axes[r][1 + min(budgets.index(str(row["budget"])) for row in group)]
        first.set_ylabel(method_label(group[0]), fontsize=8)
    question = textwrap.fill(f"item {qid}: {example.question}", 90)
    fig.suptitle(f"{question}\nreference answer: {gold_text(example.answers)}\n{subtitle(meta, rows)} · faded: "
                 "patches dropped (half: dropped by a later stage)", fontsize=8)
    save_png(fig, path, dpi=110)
    return fig
