"""VQA answer normalisation, exact match and the official leave-one-out soft score."""

from __future__ import annotations

import pytest

from tokensieve.errors import TokensieveError
from tokensieve.evaluate.scoring import exact_match, normalise_answer, score, vqa_soft_score


@pytest.mark.parametrize(("raw", "normal"), [
    ("Yes.", "yes"),                  # trailing period dropped, lowercased
    ("The Dog", "dog"),               # article dropped
    ("an apple\n", "apple"),          # newline is whitespace
    ("Two", "2"),                     # number words become digits
    ("none", "0"),                    # the official map sends "none" to 0 too
    ("1,000", "1000"),                # digit,digit: punctuation deleted, not spaced
    ("3.5", "3.5"),                   # a period before a digit stays
    ("red, blue", "red blue"),        # punctuation touching a space is deleted
    ("red,blue", "red blue"),         # otherwise it becomes a space
    ("hello-world!", "hello world"),
    ("dont", "don't"),                # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("it's", "it's"),                 # apostrophes are not punctuation
    ("  A   cat  ", "cat"),           # whitespace collapsed
])
def test_normalise_answer_follows_the_official_rules(raw, normal):
    assert normalise_answer(raw) == normal


def test_exact_match_normalises_and_accepts_any_reference():
    assert exact_match("Two.", ["2"]) == 1.0
    assert exact_match("kitten", ["cat", "a kitten"]) == 1.0
    assert exact_match("dog", ["cat"]) == 0.0


def ten(matching: int) -> list[str]:
    """Ten annotator answers, ``matching`` of them "cat"."""
    return ["cat"] * matching + ["dog"] * (10 - matching)


# k of 10 answers match. Leaving out a matching answer leaves k - 1 matches (k such subsets),
# leaving out another leaves k (10 - k subsets); each subset scores min(1, matches / 3).
@pytest.mark.parametrize(("matching", "expected"), [
    (0, 0.0),
    (1, 0.3),   # (1 * min(1, 0/3) + 9 * min(1, 1/3)) / 10 = 3 / 10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10 = 9 / 10: not 1.0, unlike the simplified min(1, k/3)
    (4, 1.0),   # (4 * 1 + 6 * 1) / 10
    (10, 1.0),
])
def test_soft_score_of_ten_answers(matching, expected):
    assert vqa_soft_score("cat", ten(matching)) == pytest.approx(expected)


def test_soft_score_normalises_both_sides():
    assert vqa_soft_score("The Cat!", ten(4)) == pytest.approx(1.0)
    assert vqa_soft_score("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)


def test_soft_score_of_fewer_answers_uses_the_same_formula():
    # 5 answers, 2 match: (2 * 1/3 + 3 * 2/3) / 5 = (2/3 + 2) / 5 = 8/15
    assert vqa_soft_score("cat", ["cat", "cat", "dog", "dog", "bird"]) == pytest.approx(8 / 15)
    # 3 answers, all match: every subset has 2 matches, so 2/3 at most
    assert vqa_soft_score("cat", ["cat"] * 3) == pytest.approx(2 / 3)


def test_soft_score_needs_two_answers():
    with pytest.raises(TokensieveError, match="at least 2 reference answers"):
        vqa_soft_score("cat", ["cat"])


def test_score_picks_the_metric_by_answer_count():
    assert score("cat", ["Cat"]) == 1.0                       # one answer: exact match
    assert score("cat", ten(3)) == pytest.approx(0.9)          # annotator votes: soft score
    assert score("kitten", ["cat", "kitten"]) == 1.0          # a few alternatives: any one is right
    with pytest.raises(TokensieveError, match="no reference answers"):
        score("cat", [])
