"""Real VQA sets: LLaVA evaluation files and Hugging Face datasets, read into ``VQAItem``s.

Everything is checked while loading (fields, image files, answer ids, spec keys, columns), so
a bad file fails at once with a message naming the file and line or row, never mid-evaluation.
Images are the exception: they are decoded only when used (see ``VQAItem``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from tokensieve.config import yaml_file
from tokensieve.data.images import load_image
from tokensieve.errors import TokensieveError

REQUIRED_SPEC_KEYS: tuple[str, ...] = ("image", "question", "answers")
OPTIONAL_SPEC_KEYS: tuple[str, ...] = ("question_id", "family", "split")


@dataclass(frozen=True)
class VQAItem:
    """One question about one image, with its reference answers.

    image: ``(H, W, 3)`` uint8, loaded lazily: read and decoded on every access and never
    cached, so a large set costs only its text in memory (and each pass decodes again).
    answers: one or more reference answers, or empty for a set loaded without answers.
    """

    question_id: str
    question: str
    answers: list[str]
    family: str = "all"
    read_image: Callable[[], np.ndarray] = field(kw_only=True, repr=False, compare=False)

    @property
    def image(self) -> np.ndarray:
        return self.read_image()


def load_llava_eval(questions: Path, image_folder: Path, answers: Path | None = None) -> list[VQAItem]:
    """Items from the LLaVA evaluation layout.

    questions: JSONL, one ``{"question_id", "image", "text"}`` object a line, ``image`` a file
    name under ``image_folder``; an optional ``category`` becomes the item's family.
    answers: optional JSONL of ``{"question_id", "answer": str}`` or ``{"question_id",
    "answers": [...]}`` lines (strings or ``{"answer": ...}`` dicts); its ids must be exactly
    the questions' ids. Without it every item has no answers.
    """
    questions, image_folder = Path(questions), Path(image_folder)
    if not image_folder.is_dir():
        raise TokensieveError(f"image folder {image_folder} does not exist")
    references = _read_answers(Path(answers)) if answers is not None else None
    items = []
    for n, row in _jsonl(questions):
        qid, name, text = (_field(row, key, questions, n) for key in ("question_id", "image", "text"))
        image = image_folder / str(name)
        if not image.is_file():
            raise TokensieveError(f"{questions} line {n}: image {name} not found in {image_folder}")
        items.append(VQAItem(str(qid), str(text), [], str(row.get("category", "all")),
                             read_image=partial(_read_file_image, image, f"{questions} line {n}")))
    _check_unique_ids(items, questions)
    if references is None:
        return items
    _check_same_ids([item.question_id for item in items], references, answers)
    return [replace(item, answers=references[item.question_id]) for item in items]


def load_spec(path: Path) -> dict[str, str]:
    """A dataset spec (see ``load_hf_dataset``) from a YAML mapping, checked."""
    return _check_spec(yaml_file(path, "dataset spec"), f"dataset spec {path}")


def load_hf_dataset(path: Path, spec: dict[str, str]) -> list[VQAItem]:
    """Items from a Hugging Face dataset on disk, mapped by ``spec``.

    path: a folder written by ``save_to_disk``, or a parquet file, or a folder of parquet
    files (split names inferred from file names, as ``datasets`` does); read offline.
    spec: column names for ``image`` (an ``Image`` feature), ``question`` and ``answers`` (a
    string, a list of strings or of ``{"answer": ...}`` dicts); optional ``question_id``
    (default: the row number) and ``family`` (default ``"all"``) columns; optional ``split``,
    required when the dataset holds several.
    """
    import datasets  # here, not at module level: it is slow to import and only this loader needs it

    path = Path(path)
    spec = _check_spec(spec, "dataset spec")
    ds = _pick_split(_open_dataset(path), spec.get("split"), path)
    columns = {key: col for key, col in spec.items() if key != "split"}
    if missing := [col for col in columns.values() if col not in ds.column_names]:
        raise TokensieveError(f"column(s) {', '.join(map(repr, missing))} not in {path}; "
                              f"its columns: {', '.join(ds.column_names)}")
    if not isinstance(ds.features[spec["image"]], datasets.Image):
        raise TokensieveError(f"column {spec['image']!r} in {path} holds {ds.features[spec['image']]}, "
                              "not an Image feature")
    text = ds.select_columns(list(dict.fromkeys(c for k, c in columns.items() if k != "image"))).to_dict()
    images = ds.select_columns([spec["image"]])
    items = [
        VQAItem(
            question_id=str(text[spec["question_id"]][i]) if "question_id" in spec else str(i),
            question=str(text[spec["question"]][i]),
            answers=_answer_list(text[spec["answers"]][i], f"{path} row {i}"),
            family=str(text[spec["family"]][i]) if "family" in spec else "all",
            read_image=partial(_decode_row_image, images, spec["image"], i),
        )
        for i in range(len(ds))
    ]
    _check_unique_ids(items, path)
    return items


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file."""
    if not path.is_file():
        raise TokensieveError(f"{path} does not exist")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TokensieveError(f"{path} line {n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TokensieveError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _field(row: dict[str, Any], key: str, path: Path, n: int) -> Any:
    if key not in row:
        raise TokensieveError(f"{path} line {n}: missing field {key!r}")
    return row[key]


def _read_answers(path: Path) -> dict[str, list[str]]:
    """Question id -> reference answers, from an answers JSONL file."""
    references: dict[str, list[str]] = {}
    for n, row in _jsonl(path):
        qid = str(_field(row, "question_id", path, n))
        if "answers" not in row and "answer" not in row:
            raise TokensieveError(f"{path} line {n}: missing field 'answer' or 'answers'")
        if qid in references:
            raise TokensieveError(f"{path} line {n}: second answer line for question_id {qid}")
        references[qid] = _answer_list(row.get("answers", row.get("answer")), f"{path} line {n}")
    return references


def _answer_list(value: Any, where: str) -> list[str]:
    """Reference answers from a string, a list of strings or of ``{"answer": ...}`` dicts, or
    a dict whose "answer" is a list (how ``datasets`` returns a Sequence of answer dicts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("answer"), list):
        value = value["answer"]
    if isinstance(value, list):
        answers = [a["answer"] if isinstance(a, dict) and "answer" in a else a for a in value]
        if answers and all(isinstance(a, str) for a in answers):
            return answers
    raise TokensieveError(f"{where}: answers must be a non-empty string, list of strings "
                          "or list of {'answer': ...} dicts")


def _few(ids: list[str], shown: int = 5) -> str:
    """``"3 (1, 2, 3)"`` or ``"12 (1, 2, 3, 4, 5, ...)"``: a count and the first ids."""
    more = ", ..." if len(ids) > shown else ""
    return f"{len(ids)} ({', '.join(ids[:shown])}{more})"


def _check_same_ids(question_ids: list[str], references: dict[str, list[str]], answers: Path) -> None:
    known = set(question_ids)
    if unanswered := [q for q in question_ids if q not in references]:
        raise TokensieveError(f"{answers} has no answer for {_few(unanswered)} question ids")
    if unknown := [q for q in references if q not in known]:
        raise TokensieveError(f"{answers} answers {_few(unknown)} question ids that are not among the questions")


def _check_unique_ids(items: list[VQAItem], source: Path) -> None:
    counts = Counter(i.question_id for i in items)
    if repeated := [qid for qid, count in counts.items() if count > 1]:
        raise TokensieveError(f"{source} repeats {_few(repeated)} question ids")


def _check_spec(spec: Any, where: str) -> dict[str, str]:
    """The spec itself when its keys are known, the required ones present and values strings."""
    if not isinstance(spec, dict):
        raise TokensieveError(f"{where} must be a mapping, got {type(spec).__name__}")
    known = REQUIRED_SPEC_KEYS + OPTIONAL_SPEC_KEYS
    if unknown := [k for k in spec if k not in known]:
        raise TokensieveError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if missing := [k for k in REQUIRED_SPEC_KEYS if k not in spec]:
        raise TokensieveError(f"{where}: missing key(s) {', '.join(missing)}; required: {', '.join(REQUIRED_SPEC_KEYS)}")
    if not_text := [k for k, v in spec.items() if not isinstance(v, str)]:
        raise TokensieveError(f"{where}: value(s) of {', '.join(not_text)} must be names (strings)")
    return spec


def _open_dataset(path: Path) -> Any:
    """A ``Dataset`` or ``DatasetDict`` from a ``save_to_disk`` folder or parquet data."""
    import datasets

    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path))
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return datasets.load_from_disk(str(path))
    if path.is_dir() and any(path.rglob("*.parquet")):
        return datasets.load_dataset("parquet", data_dir=str(path))
    raise TokensieveError(f"{path} is neither a dataset saved with save_to_disk nor a parquet file or folder")


def _pick_split(loaded: Any, split: str | None, path: Path) -> Any:
    """The one ``Dataset`` to read: the named split, or the only one there is."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        if split is not None:
            raise TokensieveError(f"{path} is a single dataset without splits; remove 'split' from the spec")
        return loaded
    if split is None:
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise TokensieveError(f"{path} holds splits {', '.join(loaded)}; name one with 'split' in the spec")
    if split not in loaded:
        raise TokensieveError(f"split {split!r} not in {path}; its splits: {', '.join(loaded)}")
    return loaded[split]


def _read_file_image(path: Path, where: str) -> np.ndarray:
    """The image at ``path`` as ``(H, W, 3)`` uint8; an unreadable one names ``where`` it was asked for."""
    try:
        return np.asarray(load_image(path))
    except TokensieveError as err:
        raise TokensieveError(f"{where}: {err}") from None


def _decode_row_image(images: Any, column: str, row: int) -> np.ndarray:
    try:
        return np.asarray(images[row][column].convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise TokensieveError(f"cannot decode the image in row {row}: {err.__class__.__name__}") from None
