"""Synthetic visual question answering: coloured shapes on a noisy background.

Every sample is a pure function of ``(seed, index)``: the same pair always gives the same
image, question and answer. Objects are 16px shapes that fill exactly one 2x2 block of
8px patches, with at least one empty patch between objects, so most of the 100 visual
tokens are background and the few that matter are known (``Sample.object_patches``).
A spec with several ``sizes`` draws each scene at one of them (the Qwen testbed's rows then
carry different token counts); a one-size spec gives the same samples as before sizes existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 200, 70),
    "blue": (55, 95, 235),
    "yellow": (235, 220, 45),
    "purple": (165, 65, 210),
    "cyan": (45, 215, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
FAMILIES: tuple[str, ...] = ("color_of_shape", "shape_of_color", "count", "exists", "spatial")
COUNT_WORDS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")

# Named splits draw from disjoint seeds so held-out scenes are never trained on: "heldout" is
# what evaluations measure, "validation" what a training run picks its best checkpoint on.
SPLIT_SEEDS: dict[str, int] = {"train": 0, "heldout": 1, "validation": 2}


def training_seed(offset: int) -> int:
    """The training split's seed for a data-seed ``offset``: 0 for 0, and never another split's
    (they are multiples of a stride above every split seed)."""
    if offset < 0:
        raise ValueError(f"a data seed offset must be >= 0, got {offset}")
    return SPLIT_SEEDS["train"] + offset * (max(SPLIT_SEEDS.values()) + 1)


@dataclass(frozen=True)
class SceneSpec:
    """Geometry of a scene: ``grid_rows x grid_cols`` patches of ``patch_size`` pixels.

    image_size: the height in pixels, and the width unless ``image_width`` is given.
    sizes: ``(height, width)`` pixel sizes; when given, each sample is drawn at one of them,
    chosen by its ``(seed, index)`` on a random stream of its own (:meth:`drawn_for`).
    """

    image_size: int = 80
    patch_size: int = 8
    min_objects: int = 3
    max_objects: int = 5
    background_level: int = 28
    noise_std: float = 7.0
    image_width: int | None = None
    sizes: tuple[tuple[int, int], ...] = ()

    @property
    def height(self) -> int:
        return self.image_size

    @property
    def width(self) -> int:
        return self.image_width or self.image_size

    @property
    def grid_rows(self) -> int:
        return self.height // self.patch_size

    @property
    def grid_cols(self) -> int:
        return self.width // self.patch_size

    @property
    def grid(self) -> int:
        """The longest side in patches, over every size (the classes of a row or column label)."""
        sides = [side for size in self.sizes for side in size] or [self.height, self.width]
        return max(sides) // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_rows * self.grid_cols

    def at(self, height: int, width: int) -> SceneSpec:
        """This spec at one ``height x width`` pixel size."""
        return replace(self, image_size=height, image_width=width, sizes=())

    def drawn_for(self, seed: int, index: int) -> SceneSpec:
        """The one-size spec sample ``(seed, index)`` is drawn at (from a stream the scene does not
        use, so the scene's own draws are those of a one-size spec)."""
        if not self.sizes:
            return self
        pick = np.random.default_rng([seed, index, SIZE_STREAM]).integers(len(self.sizes))
        return self.at(*self.sizes[pick])


SIZE_STREAM = 3  # third seed word of the stream that picks a scene's size


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``(row, col)`` is the top-left patch of its 2x2 patch block."""

    colour: str
    shape: str
    row: int
    col: int

    def patch_indices(self, grid: int) -> tuple[int, ...]:
        """Row-major indices of the 4 patches the object covers; grid: the patch grid's columns."""
        return tuple((self.row + dr) * grid + self.col + dc for dr in (0, 1) for dc in (0, 1))

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    image: ``(H, W, 3)`` uint8, or None when made with ``with_image=False``.
    object_patches: sorted patch indices covered by objects (row-major over ``grid``).
    grid: ``(rows, cols)`` of the scene's patch grid.
    """

    seed: int
    index: int
    image: np.ndarray | None = field(repr=False)
    objects: tuple[SceneObject, ...]
    family: str
    question: str
    answer: str
    object_patches: tuple[int, ...]
    grid: tuple[int, int]


def _place_objects(rng: np.random.Generator, spec: SceneSpec, n: int) -> list[tuple[int, int]]:
    """Top-left patches of ``n`` 2x2 blocks, pairwise separated by at least one empty patch."""
    for _ in range(100):
        spots: list[tuple[int, int]] = []
        for _ in range(200):
            # An array bound draws as the scalar bound with size=2 did (same stream, square grids).
            r, c = (int(v) for v in rng.integers(0, [spec.grid_rows - 1, spec.grid_cols - 1]))
            if all(abs(r - r2) >= 3 or abs(c - c2) >= 3 for r2, c2 in spots):
                spots.append((r, c))
                if len(spots) == n:
                    return spots
    raise ValueError(f"cannot place {n} separated objects on a {spec.grid_rows}x{spec.grid_cols} patch grid")


def _draw_scene(rng: np.random.Generator, spec: SceneSpec) -> tuple[SceneObject, ...]:
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)  # (colour, shape) unique per scene
    spots = _place_objects(rng, spec, n)
    return tuple(SceneObject(*pairs[k], *spot) for k, spot in zip(chosen, spots))


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a shape drawn with a 1px margin."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    centre, half = size / 2, size / 2 - 1.5
    if shape == "circle":
        return (yy - centre) ** 2 + (xx - centre) ** 2 <= half**2
    if shape == "square":
        return (np.abs(yy - centre) <= half - 1) & (np.abs(xx - centre) <= half - 1)
    if shape == "triangle":  # apex up; width grows linearly with depth
        top, bottom = centre - half, centre + half
        t = (yy - top) / (bottom - top)
        return (t >= 0) & (t <= 1) & (np.abs(xx - centre) <= t * half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: tuple[SceneObject, ...], spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """Render objects on a noisy dark background; returns ``(H, W, 3)`` uint8."""
    img = rng.normal(spec.background_level, spec.noise_std, size=(spec.height, spec.width, 3))
    box = 2 * spec.patch_size
    for obj in objects:
        colour = np.array(COLOURS[obj.colour], dtype=float) + rng.normal(0, 8, size=3)
        y, x = obj.row * spec.patch_size, obj.col * spec.patch_size
        region = img[y : y + box, x : x + box]
        region[_shape_mask(obj.shape, box)] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def _pick_unique(rng: np.random.Generator, objects: tuple[SceneObject, ...], attribute: str) -> SceneObject | None:
    """A random object whose ``attribute`` (colour or shape) no other object shares, if any."""
    values = [getattr(o, attribute) for o in objects]
    unique = [o for o, v in zip(objects, values) if values.count(v) == 1]
    return unique[rng.integers(len(unique))] if unique else None


def _ask(rng: np.random.Generator, objects: tuple[SceneObject, ...], family: str) -> tuple[str, str] | None:
    """A (question, answer) of ``family`` about the scene, or None if the scene cannot support it."""
    colours = [o.colour for o in objects]
    if family == "color_of_shape":
        obj = _pick_unique(rng, objects, "shape")
        return None if obj is None else (f"What color is the {obj.shape}?", obj.colour)
    if family == "shape_of_color":
        obj = _pick_unique(rng, objects, "colour")
        return None if obj is None else (f"What shape is the {obj.colour} object?", obj.shape)
    if family == "count":
        # Half the time a colour that is present, so counts are not almost always 0.
        pool = colours if rng.random() < 0.5 else list(COLOURS)
        colour = pool[rng.integers(len(pool))]
        return f"How many {colour} objects are there?", COUNT_WORDS[colours.count(colour)]
    if family == "exists":
        present = {o.name for o in objects}
        if rng.random() < 0.5:
            name, answer = objects[rng.integers(len(objects))].name, "yes"
        else:
            absent = sorted(f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present)
            name, answer = absent[rng.integers(len(absent))], "no"
        return f"Is there a {name}?", answer
    if family == "spatial":
        if len(objects) < 2:
            return None
        i, j = rng.choice(len(objects), size=2, replace=False)
        a, b = objects[i], objects[j]
        # Only relations that the layout decides: blocks must not overlap on that axis.
        true_relations = []
        if abs(a.col - b.col) >= 2:
            true_relations.append("left of" if a.col < b.col else "right of")
        if abs(a.row - b.row) >= 2:
            true_relations.append("above" if a.row < b.row else "below")
        decided = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        relation = true_relations[rng.integers(len(true_relations))]
        answer = "yes"
        if rng.random() < 0.5:
            relation, answer = decided[relation], "no"
        return f"Is the {a.name} {relation} the {b.name}?", answer
    raise ValueError(f"unknown question family {family!r}; expected one of {FAMILIES}")


def make_sample(
    seed: int,
    index: int,
    spec: SceneSpec = SceneSpec(),
    family: str | None = None,
    family_weights: dict[str, float] | None = None,
    with_image: bool = True,
) -> Sample:
    """The sample at ``(seed, index)``.

    The family is ``family`` if given, else drawn from ``family_weights`` (uniform by default).
    Scenes that cannot support the family (e.g. no unique shape) are redrawn. Rendering is
    the last use of the random stream, so ``with_image=False`` gives the same question.
    A spec with several ``sizes`` draws the scene at the size :meth:`SceneSpec.drawn_for` picks.
    """
    spec = spec.drawn_for(seed, index)
    rng = np.random.default_rng([seed, index])
    if family is None:
        weights = np.array([(family_weights or {}).get(f, 0.0 if family_weights else 1.0) for f in FAMILIES])
        family = FAMILIES[rng.choice(len(FAMILIES), p=weights / weights.sum())]
    elif family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; expected one of {FAMILIES}")
    while True:
        objects = _draw_scene(rng, spec)
        qa = _ask(rng, objects, family)
        if qa is not None:
            break
    image = render(objects, spec, rng) if with_image else None
    patches = tuple(sorted(p for o in objects for p in o.patch_indices(spec.grid_cols)))
    return Sample(seed, index, image, objects, family, qa[0], qa[1], patches, (spec.grid_rows, spec.grid_cols))


def blank_image(spec: SceneSpec = SceneSpec(), seed: int = 0) -> np.ndarray:
    """The background alone (noise, no objects) at a one-size spec: ``(H, W, 3)`` uint8."""
    return render((), spec, np.random.default_rng([seed, 2**31]))


def patch_labels(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch colour and shape class ids, ``(rows * cols,)`` each (the sample's grid); 0 means
    background.

    Colours are numbered 1.. in ``COLOURS`` order, shapes 1.. in ``SHAPES`` order.
    """
    rows, cols = sample.grid
    colour_ids = np.zeros(rows * cols, dtype=np.int64)
    shape_ids = np.zeros(rows * cols, dtype=np.int64)
    for obj in sample.objects:
        idx = list(obj.patch_indices(cols))
        colour_ids[idx] = list(COLOURS).index(obj.colour) + 1
        shape_ids[idx] = SHAPES.index(obj.shape) + 1
    return colour_ids, shape_ids


def vocabulary() -> list[str]:
    """Every word the question templates and answers use (for the word-level tokenizer)."""
    words = {"USER", "ASSISTANT", ":", "?", "What", "color", "is", "the", "shape", "object", "How",
             "many", "objects", "are", "there", "Is", "a", "left", "right", "of", "above", "below",
             "yes", "no"}
    words.update(COLOURS, SHAPES, COUNT_WORDS)
    return sorted(words)
