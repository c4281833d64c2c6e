"""Captioned shape images for the tiny CLIP, drawn with the synthetic scene generator.

Every image is a pure function of ``(seed, index)`` (:func:`tokensieve.data.synthetic.make_sample`
with one or two objects on a 64px, 8x8-patch canvas). Classification images hold one object
and are labelled with its ``"colour shape"`` class; retrieval and training images hold one or
two objects and are captioned ``"a photo of a red circle and a blue square."``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokensieve.data.synthetic import COLOURS, SHAPES, SceneSpec, make_sample

CLIP_SPEC = SceneSpec(image_size=64, min_objects=1, max_objects=1)  # 8 x 8 = 64 patches
CLASSNAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # 18 classes
TEMPLATES: tuple[str, ...] = ("a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a {c}.")
SEEDS = {"train": 100, "classification": 101, "retrieval": 102}  # disjoint streams per use


@dataclass(frozen=True)
class ShapeImage:
    """image: ``(64, 64, 3)`` uint8; names: the ``"colour shape"`` of each object, left to right."""

    image: np.ndarray
    names: tuple[str, ...]

    @property
    def label(self) -> int:
        """Class index of a one-object image (into :data:`CLASSNAMES`)."""
        return CLASSNAMES.index(self.names[0])

    def caption(self, template: str = "a photo of a {c}.") -> str:
        return template.format(c=" and a ".join(self.names))


def shape_image(seed: int, index: int, n_objects: int = 1, spec: SceneSpec = CLIP_SPEC) -> ShapeImage:
    """The image at ``(seed, index)`` with ``n_objects`` objects (1 or 2)."""
    spec = SceneSpec(spec.image_size, spec.patch_size, n_objects, n_objects, spec.background_level, spec.noise_std)
    sample = make_sample(seed, index, spec, family="exists")
    objects = sorted(sample.objects, key=lambda o: (o.col, o.row))
    return ShapeImage(sample.image, tuple(o.name for o in objects))


def training_pair(index: int, rng: np.random.Generator) -> tuple[ShapeImage, str]:
    """Training image ``index`` (one object in half the images, two in the rest) and a caption
    in a random template."""
    item = shape_image(SEEDS["train"], index, n_objects=1 + index % 2)
    return item, item.caption(TEMPLATES[int(rng.integers(len(TEMPLATES)))])
