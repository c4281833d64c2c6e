"""The testbed's stage-2 mention lookups: the right targets at the right tokens."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from tokensieve.backbones.llava_prompt import encode
from tokensieve.data.synthetic import COLOURS, SHAPES, SceneObject, make_sample
from tokensieve.testbed.batches import shortened_runs
from tokensieve.testbed.mention_probe import AFTER, BEFORE, MentionProbe, batch_targets, lookup_sizes, mention_targets
from tokensieve.testbed.processor import build_processor

OBJECTS = (SceneObject("red", "circle", 1, 1), SceneObject("blue", "square", 6, 5), SceneObject("red", "triangle", 2, 7))


def sample(question: str, family: str, answer: str = "yes"):
    return replace(make_sample(0, 0), objects=OBJECTS, question=question, family=family, answer=answer)


def test_a_unique_colour_looks_up_its_count_shape_and_place():
    words = "What shape is the blue object ?".split()
    assert mention_targets(sample(" ".join(words), "shape_of_color"), words) == [
        (4, "count", 1), (4, "shape", SHAPES.index("square")), (4, "row", 6), (4, "col", 5)]


def test_a_shared_colour_looks_up_only_its_count():
    words = "How many red objects are there ?".split()
    assert mention_targets(sample(" ".join(words), "count"), words) == [(2, "count", 2)]


def test_a_shape_looks_up_its_colour():
    words = "What color is the triangle ?".split()
    assert (4, "colour", list(COLOURS).index("red")) in mention_targets(sample(" ".join(words), "color_of_shape"), words)


def test_a_pair_looks_up_whether_it_exists():
    present, absent = "Is there a blue square ?".split(), "Is there a blue circle ?".split()
    assert (4, "exists", 1) in mention_targets(sample(" ".join(present), "exists"), present)
    assert (4, "exists", 0) in mention_targets(sample(" ".join(absent), "exists"), absent)
    assert not any(t[:2] == (4, "row") for t in mention_targets(sample(" ".join(absent), "exists"), absent))


def test_the_second_object_of_a_spatial_question_places_the_first():
    words = "Is the red circle left of the blue square ?".split()
    targets = mention_targets(sample(" ".join(words), "spatial"), words)
    assert (8, "relrow", BEFORE) in targets and (8, "relcol", BEFORE) in targets
    words = "Is the blue square above the red circle ?".split()
    targets = mention_targets(sample(" ".join(words), "spatial", answer="no"), words)
    assert (7, "relrow", AFTER) in targets and (7, "relcol", AFTER) in targets


def test_the_second_object_of_a_spatial_question_says_whether_the_relation_holds():
    words = "Is the red circle left of the blue square ?".split()
    assert (8, "holds", 1) in mention_targets(sample(" ".join(words), "spatial", answer="yes"), words)
    words = "Is the blue square left of the red circle ?".split()
    assert (8, "holds", 0) in mention_targets(sample(" ".join(words), "spatial", answer="no"), words)


def test_batch_targets_point_at_the_mention_tokens_from_the_end_of_padded_rows():
    processor = build_processor()
    samples = [make_sample(0, i) for i in range(6)]
    batch = encode(processor, samples)
    words = [processor.tokenizer.convert_ids_to_tokens(r) for r in batch["input_ids"].tolist()]
    rows = batch_targets(samples, batch["input_ids"], words)
    assert len(rows) > 0
    length = batch["input_ids"].shape[1]
    for b, from_end, _, _ in rows.tolist():
        assert words[b][length - from_end] in set(COLOURS) | set(SHAPES)
    probe = MentionProbe(8, 10, layer=2, relation_layer=3)
    hidden = [torch.randn(6, length, 8, requires_grad=True) for _ in range(5)]
    loss, per_lookup = probe.loss(tuple(hidden), rows)
    assert set(per_lookup) == {list(probe.heads)[k] for k in rows[:, 2].tolist()}
    loss.backward()
    holds = list(probe.heads).index("holds")
    assert (rows[:, 2] == holds).any()  # the batch has spatial questions
    for layer, wanted in ((2, rows[rows[:, 2] != holds]), (3, rows[rows[:, 2] == holds])):
        touched = hidden[layer].grad.abs().sum(-1).nonzero().tolist()
        assert sorted(map(tuple, touched)) == sorted({(b, length - f) for b, f, _, _ in wanted.tolist()})
    assert all(h.grad is None for k, h in enumerate(hidden) if k not in (2, 3))
    assert set(lookup_sizes(10)) == set(probe.heads)


def test_shortened_runs_keep_every_object_patch():
    samples = [make_sample(0, i) for i in range(8)]
    runs = shortened_runs(samples, np.random.default_rng(0))
    for s, keep in zip(samples, runs):
        assert set(s.object_patches) <= set(keep.tolist())
        assert keep.tolist() == sorted(set(keep.tolist()))
    assert len({len(k) for k in runs}) > 1  # the background share differs per row
