"""Pictures of what a method kept: each example image with its kept patches highlighted, per stage.

The image drawn is the model's own view (the processor's resized, cropped pixels, with its
normalisation undone), so patch ``p`` of an ``n x n`` grid is exactly the square at row
``p // n``, column ``p % n``. Dropped patches are dimmed; a merging method's kept tokens are the
survivors that absorbed the others.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tokensieve.backbones import LlavaBackbone

FOLDER = "kept_tokens"
DIM = 0.25  # brightness left to a dropped patch


def overlay_file(row: dict) -> str:
    """``kept_tokens/<method>_keep<keep>.png``: where a row's picture goes, relative to the report."""
    name = re.sub(r"[^A-Za-z0-9._]+", "-", f"{row['method']}_keep{row['keep']}")
    return f"{FOLDER}/{name}.png"


def model_views(backbone: LlavaBackbone, items: list) -> dict[str, np.ndarray]:
    """``{question_id: (S, S, 3) uint8}``: each item's image as the vision tower sees it."""
    processor = backbone.processor.image_processor
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    views = {}
    for item in items:
        pixels = processor(images=[item.image], return_tensors="np")["pixel_values"][0]  # (3, S, S)
        views[item.question_id] = np.clip((pixels * std + mean) * 255, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
    return views


def highlight(image: np.ndarray, kept: list[int], grid: int) -> np.ndarray:
    """``image`` ``(S, S, 3)`` with every patch not in ``kept`` (patch indices; -1, CLS, ignored) dimmed."""
    patch = image.shape[0] // grid
    mask = np.zeros((grid, grid), dtype=bool)
    for p in kept:
        if p >= 0:
            mask[divmod(p, grid)] = True
    pixels = np.kron(mask, np.ones((patch, patch), dtype=bool))[..., None]
    return np.where(pixels, image, (image * DIM).astype(np.uint8))


def plot_kept_tokens(row: dict, images: dict[str, np.ndarray], grid: int, path: Path) -> None:
    """One row per example (its image, then the tokens left after each stage), saved to ``path``."""
    examples = row["kept_tokens"]
    stages = list(examples["stages"].items())
    fig = Figure(figsize=(2.2 * (1 + len(stages)), 2.3 * len(examples["ids"])))
    axes = fig.subplots(len(examples["ids"]), 1 + len(stages), squeeze=False)
    for r, qid in enumerate(examples["ids"]):
        axes[r][0].imshow(images[qid])
        axes[r][0].set_title(f"sample {qid}", fontsize=8)
        for c, (stage, kept) in enumerate(stages, start=1):
            ax = axes[r][c]
            ax.imshow(highlight(images[qid], kept[r], grid))
            patch = images[qid].shape[0] / grid
            for p in kept[r]:
                if p >= 0:
                    y, x = divmod(p, grid)
                    ax.add_patch(Rectangle((x * patch - 0.5, y * patch - 0.5), patch, patch, fill=False,
                                           edgecolor="yellow", linewidth=0.6))
            cls = " + CLS" if -1 in kept[r] else ""
            ax.set_title(f"{stage}\n{sum(p >= 0 for p in kept[r])} patches{cls}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{row['method']} keep={row['keep']}: kept tokens (bright) per stage", fontsize=9)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
