"""tokensieve ask: a written or given scene, the answer alone, and what a method kept."""

from __future__ import annotations

import pytest
from PIL import Image

from tokensieve.ask import answer_tokens
from tokensieve.cli import main
from tokensieve.data.synthetic_eval import heldout_samples


def test_scene_is_written_and_answered_in_one_word_with_its_gold_answer(tmp_path, capsys):
    scene = tmp_path / "scene.png"
    assert main(["ask", "--scene", "3", "--save-scene", str(scene)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    sample = heldout_samples(4)[3]
    assert Image.open(scene).size == (80, 80)
    assert lines[0] == f"question: {sample.question}"
    unpruned = lines[1].removeprefix("answer (unpruned): ")
    assert len(unpruned.split()) == 1  # the testbed's one-word answer, no babble after it
    assert lines[-1] == f"gold answer: {sample.answer}"


def test_a_method_answers_beside_the_unpruned_model_and_shows_what_it_kept(tmp_path, capsys):
    scene, picture = tmp_path / "scene.png", tmp_path / "kept.png"
    Image.fromarray(heldout_samples(1)[0].image).save(scene)
    assert main(["ask", "--image", str(scene), "--question", "What color is the circle?", "--method", "fastv",
                 "--budget", "0.25", "--site", "llm.2", "--show-kept", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "answer (hard, fastv@llm.2:0.25): " in out
    assert "fastv@llm.2:0.25: 25 of 100 visual tokens kept" in out
    shown = Image.open(picture)
    assert shown.size[1] == 4 * 80 and shown.size[0] > 2 * 4 * 80  # the image and one stage, side by side


def test_answer_length_follows_the_checkpoint(tiny_llava_dir):
    assert answer_tokens(None, None) == 1  # the shipped testbed answers in one word
    assert answer_tokens(tiny_llava_dir, None) == 32  # any other model stops at its end token
    assert answer_tokens(tiny_llava_dir, 5) == 5


@pytest.mark.parametrize("argv, needle", [
    (["ask", "--question", "?"], "give --image FILE or --scene N"),
    (["ask", "--scene", "1", "--method", "fastv"], "--method needs --budget"),
    (["ask", "--scene", "1", "--budget", "0.5"], "go with --method"),
    (["ask", "--image", "x.png"], "--image needs --question"),
    (["ask", "--image", "x.png", "--question", "?", "--save-scene", "y.png"], "--save-scene"),
])
def test_bad_ask_arguments_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
