"""The synthetic VQA set: determinism, geometry, and answers that follow from the scene."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tokensieve.data.synthetic import (COLOURS, COUNT_WORDS, FAMILIES, SceneSpec, blank_image, make_sample,
                                       patch_labels, vocabulary)
from tokensieve.data.synthetic_eval import heldout_samples


def test_same_seed_and_index_give_the_same_sample():
    a, b = make_sample(3, 17), make_sample(3, 17)
    assert np.array_equal(a.image, b.image)
    assert (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
    c = make_sample(4, 17)
    assert not np.array_equal(a.image, c.image)


def test_default_scene_has_at_least_100_visual_tokens():
    spec = SceneSpec()
    assert spec.n_patches >= 100
    assert make_sample(0, 0).image.shape == (spec.image_size, spec.image_size, 3)


def test_objects_are_separated_2x2_blocks_and_patches_match_pixels():
    spec = SceneSpec()
    for i in range(30):
        s = make_sample(0, i)
        assert spec.min_objects <= len(s.objects) <= spec.max_objects
        for k, a in enumerate(s.objects):
            for b in s.objects[k + 1 :]:
                assert abs(a.row - b.row) >= 3 or abs(a.col - b.col) >= 3
        # Bright (saturated) pixels lie only in object patches, and every object patch has some.
        patches = s.image.reshape(spec.grid, spec.patch_size, spec.grid, spec.patch_size, 3)
        bright = (patches.max(axis=(1, 3, 4)) > 120).flatten()
        assert set(np.flatnonzero(bright)) == set(s.object_patches)


def test_most_tokens_are_background():
    shares = [len(make_sample(0, i).object_patches) / SceneSpec().n_patches for i in range(50)]
    assert max(shares) <= 0.2


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_follow_from_the_objects(family):
    for i in range(40):
        s = make_sample(1, i, family=family)
        words = s.question.rstrip("?").split()
        colours = [o.colour for o in s.objects]
        if family == "color_of_shape":
            (obj,) = [o for o in s.objects if o.shape == words[-1]]
            assert s.answer == obj.colour
        elif family == "shape_of_color":
            (obj,) = [o for o in s.objects if o.colour == words[-2]]
            assert s.answer == obj.shape
        elif family == "count":
            assert s.answer == COUNT_WORDS[colours.count(words[2])]
        elif family == "exists":
            present = {(o.colour, o.shape) for o in s.objects}
            assert s.answer == ("yes" if (words[-2], words[-1]) in present else "no")
        else:  # "Is the c1 s1 <relation> the c2 s2"
            (a,) = [o for o in s.objects if (o.colour, o.shape) == (words[2], words[3])]
            (b,) = [o for o in s.objects if (o.colour, o.shape) == (words[-2], words[-1])]
            relation = " ".join(words[4:-3])
            holds = {"left of": a.col + 2 <= b.col, "right of": b.col + 2 <= a.col,
                     "above": a.row + 2 <= b.row, "below": b.row + 2 <= a.row}[relation]
            assert s.answer == ("yes" if holds else "no")


def test_family_weights_and_unknown_family():
    counts = {f: 0 for f in FAMILIES}
    for i in range(300):
        counts[make_sample(0, i, family_weights={"count": 1.0, "spatial": 1.0}).family] += 1
    assert counts["count"] > 100 and counts["spatial"] > 100 and counts["exists"] == 0
    with pytest.raises(ValueError, match="unknown question family"):
        make_sample(0, 0, family="colour")


def test_yes_no_answers_are_balanced():
    answers = [make_sample(2, i, family="spatial").answer for i in range(400)]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_patch_labels_and_blank_image():
    s = make_sample(0, 5)
    colour_ids, shape_ids = patch_labels(s)
    assert set(np.flatnonzero(colour_ids)) == set(s.object_patches) == set(np.flatnonzero(shape_ids))
    assert colour_ids.max() <= len(COLOURS)
    assert blank_image().max() < 120  # background only


def test_image_free_sample_has_the_same_question():
    a, b = make_sample(0, 9), make_sample(0, 9, with_image=False)
    assert b.image is None and (a.question, a.answer) == (b.question, b.answer)


def test_too_many_objects_for_the_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot place 5 separated objects on a 4x4"):
        make_sample(0, 0, SceneSpec(image_size=32, min_objects=5, max_objects=5))


def test_vocabulary_covers_every_question_word():
    vocab = set(vocabulary())
    for i in range(200):
        s = make_sample(0, i)
        assert set(s.question.replace("?", " ?").split()) <= vocab and s.answer in vocab


def test_no_training_stream_draws_the_scenes_of_another_split():
    from tokensieve.data.synthetic import SPLIT_SEEDS, training_seed

    assert training_seed(0) == SPLIT_SEEDS["train"]  # the default stream is unchanged
    streams = {training_seed(k) for k in range(1000)}
    assert len(streams) == 1000 and not streams & {SPLIT_SEEDS["heldout"], SPLIT_SEEDS["validation"]}
    with pytest.raises(ValueError, match=">= 0"):
        training_seed(-1)


def _fingerprint(samples) -> str:
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.image.tobytes())
        digest.update(repr((s.objects, s.family, s.question, s.answer, s.object_patches)).encode())
    return digest.hexdigest()


def test_one_size_samples_are_those_drawn_before_scenes_had_several_sizes():
    # Pinned from the code at commit d29fdd7, before SceneSpec.sizes: the LLaVA testbed's held-out
    # and training samples (and so the shipped testbed's accuracy) must not move.
    samples = heldout_samples(200) + [make_sample(0, i, family_weights={"spatial": 2.0, "count": 1.0})
                                      for i in range(100)]
    assert _fingerprint(samples) == "5b9f7f4fdb1441827de40ba7e1360a9928f6ad9d0c8f31d6587da812242ba37c"


def test_a_spec_with_several_sizes_draws_each_scene_at_one_of_them():
    spec = SceneSpec(image_size=192, patch_size=16, sizes=((128, 128), (128, 192), (192, 160)))
    samples = [make_sample(5, i, spec) for i in range(40)]
    assert {s.image.shape for s in samples} == {(128, 128, 3), (128, 192, 3), (192, 160, 3)}
    assert spec.grid == 12  # the longest side over every size: classes of a row or column label
    for s in samples:
        rows, cols = s.grid
        assert s.image.shape[:2] == (rows * 16, cols * 16)
        assert all(o.row + 1 < rows and o.col + 1 < cols for o in s.objects)
        colour_ids, _ = patch_labels(s)
        assert sorted(colour_ids.nonzero()[0].tolist()) == list(s.object_patches)
        # The size's own stream: the same sample at that one size is the same scene.
        alone = make_sample(5, s.index, spec.at(*s.image.shape[:2]))
        assert alone.question == s.question and (alone.image == s.image).all()
