"""Scoring free-form answers the way the official VQA evaluation does.

Normalisation follows ``vqaEval.py`` of the official VQA evaluation tools (GT-Vision-Lab/VQA),
applied in its order:

1. newlines and tabs become spaces; the text is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it
   touches a space or the text has a digit-comma-digit group (``"1,000"``), else replaced by
   a space; then every ``.`` not followed by a digit is deleted (so ``"2.5"`` keeps its point);
   apostrophes, colons and other characters are kept, as in the official list;
3. lowercase, split on whitespace, number words ``none``/``zero`` .. ``ten`` become digits,
   the articles ``a``/``an``/``the`` are dropped, apostrophe-less contractions (``"dont"``)
   get their apostrophes back, and the words are joined with single spaces.

One deliberate difference: the official script normalises predictions fully but reference
answers only by step 2 (the released VQA annotations are already normalised); here both sides
go through all steps, so references from any dataset compare on equal terms. On the released
VQA annotations the two agree.
"""

from __future__ import annotations

import re

from tokensieve.errors import TokensieveError

PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                                ">", "<", "@", "`", ",", "?", "!")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a lookahead (a typo for a
# lookbehind) that never fails before a ".", so it deletes every "." not followed by a digit.
PERIOD = re.compile(r"\.(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
NUMBER_WORDS: dict[str, str] = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The contracted forms the official table restores. Its keys are exactly these forms with one
# apostrophe dropped ("couldnt've" and "couldn'tve" -> "couldn't've"), so they are derived below.
# Left out: its capitalised "I" keys, which never meet the lowercased words, and its one reversed
# entry ("somebody'd" -> "somebodyd").
_CONTRACTED: tuple[str, ...] = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've",
    "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've",
)
CONTRACTIONS: dict[str, str] = {
    word[:i] + word[i + 1:]: word for word in _CONTRACTED for i, ch in enumerate(word) if ch == "'"
}


def _strip_punctuation(text: str) -> str:
    """Step 2 of the module docstring; conditions are tested on the input, as officially."""
    join = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if join or p + " " in text or " " + p in text else " ")
    return PERIOD.sub("", out)


def normalise_answer(text: str) -> str:
    """An answer in the official VQA evaluation's canonical form (see the module docstring)."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = (NUMBER_WORDS.get(w, w) for w in text.lower().split())
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    pred = normalise_answer(prediction)
    return float(any(normalise_answer(a) == pred for a in answers))


def vqa_soft_score(prediction: str, answers: list[str]) -> float:
    """Official VQAv2 accuracy: the mean, over the subsets that leave out one reference
    answer each, of ``min(1, matches in the subset / 3)``.

    With the usual 10 answers, k matching answers score 0, 0.3, 0.6, 0.9 for k = 0..3 and
    1.0 from k = 4. Any other count n >= 2 is scored by the same formula over its n subsets,
    as the official script does with whatever answers an item has; full credit then still
    needs 4 matching answers, so items with fewer than 4 references never score 1.0.
    """
    if len(answers) < 2:
        raise TokensieveError(f"the VQA soft score needs at least 2 reference answers, got {len(answers)}")
    pred = normalise_answer(prediction)
    hits = [normalise_answer(a) == pred for a in answers]
    matches = sum(hits)
    # Leaving out answer i removes its own hit from the count.
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(hits)


# VQAv2, TextVQA and VizWiz give 10 annotator answers per question; shorter lists are
# alternatives (any one is right), which the soft score would under-credit.
SOFT_SCORE_MIN_ANSWERS = 10


def score(prediction: str, answers: list[str]) -> float:
    """The VQA soft score for annotator votes (10 or more answers), else exact match against any."""
    if not answers:
        raise TokensieveError("no reference answers to score the prediction against")
    if len(answers) >= SOFT_SCORE_MIN_ANSWERS:
        return vqa_soft_score(prediction, answers)
    return exact_match(prediction, answers)


def accuracy_summary(families: list[str], scores: list[float]) -> dict:
    """``{"accuracy", "per_family"}``: the mean score overall and per family, to 4 decimals.

    families, scores: one entry per scored item."""
    if not scores:
        raise TokensieveError("no scored items to summarise")
    by_family: dict[str, list[float]] = {}
    for family, value in zip(families, scores, strict=True):
        by_family.setdefault(family, []).append(value)
    return {"accuracy": round(sum(scores) / len(scores), 4),
            "per_family": {f: round(sum(v) / len(v), 4) for f, v in sorted(by_family.items())}}
