"""The synthetic set as evaluations draw and probe it.

Held-out samples at a model's own geometry, and the controls that show whether a model reads
its visual tokens: a question-only guess, random or object-only keeps, the object oracle at a
budget, and where CLS attention falls relative to the objects.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np
import torch

from tokensieve.data.synthetic import FAMILIES, SPLIT_SEEDS, Sample, SceneSpec, make_sample

# Per-sample indices ``(M,)`` of the visual tokens that enter the LLM, increasing.
KeptFn = Callable[[Sample], torch.Tensor]


def heldout_samples(n: int, split: str = "heldout", spec: SceneSpec = SceneSpec()) -> list[Sample]:
    """The first ``n`` samples of a split, families cycling so each gets ``n / 5``."""
    return [make_sample(SPLIT_SEEDS[split], i, spec, family=FAMILIES[i % len(FAMILIES)]) for i in range(n)]


def question_only_predictor(n_reference: int, spec: SceneSpec = SceneSpec()) -> Callable[[Sample], str]:
    """Best guess from the question alone: the most frequent training answer to that exact
    question (family majority for unseen questions), from ``n_reference`` training samples."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_family: dict[str, Counter] = defaultdict(Counter)
    for i in range(n_reference):
        s = make_sample(SPLIT_SEEDS["train"], i, spec, family=FAMILIES[i % len(FAMILIES)], with_image=False)
        by_question[s.question][s.answer] += 1
        by_family[s.family][s.answer] += 1

    def guess(sample: Sample) -> str:
        counts = by_question.get(sample.question) or by_family[sample.family]
        return counts.most_common(1)[0][0]

    return guess


def random_keep(fraction: float, n_tokens: int | None, seed: int = 0) -> KeptFn:
    """A random ``round(fraction * n)`` tokens per sample, sorted, seeded by the sample; ``n`` is
    ``n_tokens``, or with None each sample's own patch count (scenes of several sizes)."""

    def kept(sample: Sample) -> torch.Tensor:
        n = n_tokens or sample.grid[0] * sample.grid[1]
        rng = np.random.default_rng([seed, sample.seed, sample.index])
        return torch.from_numpy(np.sort(rng.choice(n, size=max(1, round(fraction * n)), replace=False)))

    return kept


def object_keep(sample: Sample) -> torch.Tensor:
    """Only the tokens of patches covered by objects (the oracle)."""
    return torch.tensor(sample.object_patches)


def object_oracle(count: int, grid: int) -> KeptFn:
    """The object oracle at a budget of ``count`` tokens: tokens on objects only, one per object
    before a second (each object's 4 patches taken in turn), at most ``count``, sorted."""

    def kept(sample: Sample) -> torch.Tensor:
        per_object = [o.patch_indices(grid) for o in sample.objects]
        order = [patches[rank] for rank in range(4) for patches in per_object]
        return torch.tensor(sorted(order[:count]))

    return kept


def object_attention_ratio(attention: torch.Tensor | list[torch.Tensor], samples: list[Sample]) -> float:
    """Mean over samples of (attention share on object patches) / (object patches' share).

    attention: per sample its attention over its patch tokens, ``(B, N)`` (LLaVA: the CLS row) or a list of
    ``(N_i,)`` (Qwen-VL: the attention each token receives, on images of several sizes).
    """
    ratios = []
    for row, s in zip(attention, samples):
        share = float(row[list(s.object_patches)].sum() / row.sum())
        ratios.append(share / (len(s.object_patches) / row.numel()))
    return float(np.mean(ratios))


# Visual tokens a side of a synthetic scene on a Qwen-VL model (LLaVA's testbed has 10x10 patches).
QWEN_SCENE_GRID = 10
# The (rows, cols) token grids a Qwen-VL scene is drawn at, the Qwen testbed's four sizes: 64 to 100 tokens.
QWEN_SCENE_TOKENS = ((8, 8), (8, 10), (10, 9), (10, 10))


def scene_spec_for(backbone) -> SceneSpec:
    """Scenes drawn so that a scene's patch is one visual token: at a LLaVA model's own image and patch
    size; on a Qwen-VL model (a :class:`QwenVLBackbone`), whose token is a 2x2 group of patches, at that
    size (28 px), each at one of the :data:`QWEN_SCENE_TOKENS` grids (the Qwen testbed's sizes, so rows
    carry different token counts), or, where its processor's ``max_pixels`` allows fewer tokens, at the
    largest square it allows."""
    from tokensieve.backbones.hf_qwen import QwenVLBackbone

    vision = backbone.config.vision_config
    if isinstance(backbone, QwenVLBackbone):
        unit = vision.patch_size * vision.spatial_merge_size
        grid = min(QWEN_SCENE_GRID, math.isqrt(backbone.most_image_tokens()))
        sizes = tuple((rows * unit, cols * unit) for rows, cols in QWEN_SCENE_TOKENS) if grid == QWEN_SCENE_GRID else ()
        return SceneSpec(image_size=grid * unit, patch_size=unit, sizes=sizes)
    return SceneSpec(image_size=vision.image_size, patch_size=vision.patch_size)
