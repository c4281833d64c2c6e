"""Deterministic training batches for the two testbed stages (batch ``i`` depends only on ``i``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from tokensieve.backbones.llava_prompt import encode as llava_encode
from tokensieve.data.synthetic import COLOURS, SHAPES, SceneSpec, Sample, make_sample, patch_labels
from tokensieve.testbed.mention_probe import batch_targets

# Tower-stage scenes come from a far index range so they never repeat LLM-stage scenes.
TOWER_INDEX_OFFSET = 1_000_000_000


def presence_targets(sample: Sample) -> np.ndarray:
    """Multi-hot ``(len(COLOURS) * len(SHAPES),)`` of the colour-shape pairs in the scene."""
    target = np.zeros(len(COLOURS) * len(SHAPES), dtype=np.float32)
    for obj in sample.objects:
        target[list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)] = 1.0
    return target


def _grid_ids(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch, ``(rows * cols,)`` each, row-major over the sample's grid."""
    rows, cols = sample.grid
    return np.repeat(np.arange(rows), cols), np.tile(np.arange(cols), rows)


class TowerBatches(torch.utils.data.Dataset):
    """Batch ``i``: the image processor's outputs (``pixel_values``, and ``image_grid_thw`` for
    Qwen), per-patch ``colour_ids``, ``shape_ids``, ``row_ids``, ``col_ids`` ``(sum_b N_b,)`` (the
    samples' patches one after the other, row-major) and ``presence`` ``(B, pairs)`` targets."""

    def __init__(self, processor, seed: int, batch_size: int, spec: SceneSpec = SceneSpec()):
        self.processor, self.seed, self.batch_size, self.spec = processor, seed, batch_size, spec

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        first = TOWER_INDEX_OFFSET + i * self.batch_size
        samples = [make_sample(self.seed, first + k, self.spec) for k in range(self.batch_size)]
        labels = [patch_labels(s) + _grid_ids(s) for s in samples]
        pixels = self.processor.image_processor(images=[s.image for s in samples], return_tensors="pt")
        joined = {name: torch.from_numpy(np.concatenate([row[k] for row in labels]))
                  for k, name in enumerate(("colour_ids", "shape_ids", "row_ids", "col_ids"))}
        return {**pixels, **joined, "presence": torch.from_numpy(np.stack([presence_targets(s) for s in samples]))}


def shortened_runs(samples: list[Sample], rng: np.random.Generator) -> list[torch.Tensor]:
    """Per row: every object patch plus a random share (uniform in [0, 1)) of the background
    (the sample's own patch count), sorted. Training on such runs teaches the LLM lookups that
    survive token removal."""
    kept = []
    for s in samples:
        background = np.setdiff1d(np.arange(s.grid[0] * s.grid[1]), s.object_patches)
        chosen = rng.choice(background, size=int(rng.random() * len(background)), replace=False)
        kept.append(torch.from_numpy(np.sort(np.concatenate([np.array(s.object_patches), chosen]))).long())
    return kept


class QuestionBatches(torch.utils.data.Dataset):
    """Batch ``i``: processor inputs, the answer token id of each question, the mention lookups
    (:func:`tokensieve.testbed.mention_probe.batch_targets`) and, for a ``short_run_share`` of
    batches, the visual tokens each row keeps (``kept``; None: all).

    object_curriculum: ``(first_batch, min_objects, max_objects)`` rows, sorted; batch ``i``
    uses the last row whose ``first_batch <= i``.
    encode: ``(processor, samples) -> inputs``, the backbone's prompt format (LLaVA-1.5's by default).
    """

    def __init__(self, processor, seed: int, batch_size: int,
                 family_weights: dict[str, float], object_curriculum: list[tuple[int, int, int]],
                 spec: SceneSpec = SceneSpec(), short_run_share: float = 0.0,
                 encode: Callable[..., dict[str, torch.Tensor]] = llava_encode):
        self.processor, self.seed, self.batch_size, self.encode = processor, seed, batch_size, encode
        self.family_weights, self.spec, self.short_run_share = family_weights, spec, short_run_share
        self.curriculum = sorted(object_curriculum)

    def spec_at(self, i: int) -> SceneSpec:
        _, lo, hi = [row for row in self.curriculum if row[0] <= i][-1]
        return replace(self.spec, min_objects=lo, max_objects=hi)

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        spec = self.spec_at(i)
        samples = [
            make_sample(self.seed, i * self.batch_size + k, spec, family_weights=self.family_weights)
            for k in range(self.batch_size)
        ]
        batch = self.encode(self.processor, samples)
        tok = self.processor.tokenizer
        batch["answer_ids"] = torch.tensor(tok.convert_tokens_to_ids([s.answer for s in samples]))
        words = [tok.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
        batch["mention_targets"] = batch_targets(samples, batch["input_ids"], words)
        rng = np.random.default_rng([self.seed, i, 7])
        batch["kept"] = shortened_runs(samples, rng) if rng.random() < self.short_run_share else None
        return batch
