"""Training data for the learned pruner in the LLaVA instruction format, and its collate.

``load_instruct`` reads LLaVA-Instruct files (a JSON list of records, or JSONL), checking every
record, conversation and image file while loading, so a bad file fails at once with a message
naming the file, the record and the field; images are decoded only when used.
``synthetic_examples`` gives the synthetic VQA set in the same form, with images in memory.
``collate`` renders conversations in the LLaVA-1.5 format and labels exactly the assistant
answers and the ``</s>`` after each. Labels come from the fast tokenizer's character offsets,
not from tokenizing pieces, so they hold for any fast tokenizer (the testbed's word-level one
or LLaMA's), whatever it does at piece boundaries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlavaProcessor

from tokensieve.backbones.llava_prompt import LATER_TURN_TEMPLATE, prompt
from tokensieve.data.images import load_image
from tokensieve.data.synthetic import SceneSpec, make_sample
from tokensieve.errors import TokensieveError

IMAGE_MARKER = "<image>"
EOS = "</s>"
IGNORE_INDEX = -100  # the label Hugging Face losses skip
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class InstructExample:
    """One image and a conversation about it.

    turns: ``(question, answer)`` pairs in order; the first question holds no ``<image>``
    marker (rendering puts the image in front of it).
    image_path: the image file, or None for an image held in memory (the synthetic set).
    image: ``(H, W, 3)`` uint8 from ``read_image``. A file is read and decoded on every access
    and never cached, as in ``VQAItem``; an in-memory image is returned as it is.
    Build with ``from_file`` or ``from_array`` so that ``image_path`` and ``read_image`` agree.
    """

    id: str
    turns: list[tuple[str, str]]
    image_path: Path | None = None
    read_image: Callable[[], np.ndarray] = field(kw_only=True, repr=False, compare=False)

    @classmethod
    def from_file(cls, id: str, turns: list[tuple[str, str]], image_path: Path) -> InstructExample:
        image_path = Path(image_path)
        return cls(id, turns, image_path, read_image=partial(_read_rgb, image_path))

    @classmethod
    def from_array(cls, id: str, turns: list[tuple[str, str]], image: np.ndarray) -> InstructExample:
        """image: ``(H, W, 3)`` uint8."""
        # partial of a module-level function, not a lambda, so examples pickle (DataLoader workers).
        return cls(id, turns, None, read_image=partial(np.asarray, image))

    @property
    def image(self) -> np.ndarray:
        return self.read_image()


def load_instruct(path: Path, image_folder: Path) -> list[InstructExample]:
    """Examples from a LLaVA-Instruct file.

    path: a JSON list of ``{"id", "image", "conversations"}`` records, or JSONL with one record
    a line (told apart by the first character: ``[`` starts a JSON list). ``image`` is a file
    name under ``image_folder``; ``conversations`` is a list of ``{"from", "value"}`` messages,
    ``from`` alternating ``"human"`` / ``"gpt"``, starting with human and ending with gpt. The
    ``<image>`` marker appears exactly once, in the first human message, before or after the
    text; it is taken out of the question (LLaVA-1.5 puts it in front when rendering).
    Text-only records (no ``image`` field, as in LLaVA's mix665k) are skipped: there are no
    visual tokens to prune in them.
    """
    path, image_folder = Path(path), Path(image_folder)
    if not image_folder.is_dir():
        raise TokensieveError(f"image folder {image_folder} does not exist")
    records = _records(path)
    if not records:
        raise TokensieveError(f"{path} holds no records")
    examples = [_example(row, where, image_folder) for where, row in records
                if not (isinstance(row, dict) and "image" not in row)]
    if not examples:
        raise TokensieveError(f"{path} holds no record with an image (text-only records are skipped)")
    return examples


def synthetic_examples(
    seed: int,
    start: int,
    count: int,
    spec: SceneSpec = SceneSpec(),
    family_weights: dict[str, float] | None = None,
) -> list[InstructExample]:
    """Samples ``start .. start + count - 1`` of the synthetic set at ``seed`` (see
    ``make_sample``) as single-turn examples with in-memory images, id ``synthetic-{seed}-{index}``."""
    samples = (make_sample(seed, index, spec, family_weights=family_weights) for index in range(start, start + count))
    return [InstructExample.from_array(f"synthetic-{s.seed}-{s.index}", [(s.question, s.answer)], s.image)
            for s in samples]


def render_conversation(turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The LLaVA-1.5 text of a conversation and where its answers are.

    text: ``"USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"``; the first
    turn is LLaVA's ``prompt(q1)`` (:mod:`tokensieve.backbones.llava_prompt`) followed by ``" {a1}</s>"``.
    answer_spans: ``(start, end)`` character offsets in text of each answer with its ``</s>``.
    """
    # "</s>" is glued to the answer as in LLaVA-1.5. The testbed's word-level tokenizer (and
    # LLaMA's) holds "</s>" as a special added token, matched before the whitespace
    # pre-tokenizer splits words, so "a</s>USER" still gives "a", the eos id, "USER".
    if not turns:
        raise TokensieveError("a conversation needs at least one (question, answer) turn")
    text, spans = "", []
    for k, (question, answer) in enumerate(turns):
        text += (prompt(question) if k == 0 else LATER_TURN_TEMPLATE.format(question=question)) + " "
        spans.append((len(text), len(text) + len(answer) + len(EOS)))
        text += answer + EOS
    return text, spans


def collate(processor: LlavaProcessor, examples: list[InstructExample],
            max_length: int | None = None, label_eos: bool = True) -> dict[str, torch.Tensor]:
    """A training batch of rendered conversations.

    Returns ``input_ids``, ``attention_mask``, ``labels``: ``(B, L)`` int64, padded on the
    tokenizer's padding side and, with ``max_length``, each row cut to at most that many tokens
    on its truncation side (an error, naming the example, if that would cut image tokens).
    labels are ``-100`` except on the tokens of every assistant answer and its ``</s>``, where
    they equal ``input_ids`` (not shifted: the model shifts them). ``label_eos=False`` leaves the
    ``</s>`` unlabelled, for models trained to give a one-word answer and nothing after it
    (the testbed). ``pixel_values``:
    ``(B, 3, H, W)`` float32.
    """
    tokenizer = processor.tokenizer
    if not tokenizer.is_fast:
        raise TokensieveError("collate needs a fast tokenizer: labels come from its character offsets")
    rendered = [render_conversation(e.turns) for e in examples]
    encoded = processor(
        images=[e.image for e in examples], text=[text for text, _ in rendered],
        return_offsets_mapping=True, return_text_replacement_offsets=True,
    )
    rows = []
    for k, example in enumerate(examples):
        ids = encoded["input_ids"][k]
        labels = _answer_labels(ids, encoded["offset_mapping"][k], rendered[k][1],
                                encoded["text_replacement_offsets"][k])
        if not label_eos:
            labels = [IGNORE_INDEX if t == tokenizer.eos_token_id else label for t, label in zip(ids, labels)]
        rows.append(_truncate(ids, labels, max_length, tokenizer.truncation_side, processor.image_token_id, example.id))
    width = max(len(ids) for ids, _ in rows)
    pad = partial(_pad, width=width, left=tokenizer.padding_side == "left")
    return {
        "input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in rows]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),
        "pixel_values": torch.from_numpy(np.stack(encoded["pixel_values"])),
        "labels": torch.tensor([pad(labels, IGNORE_INDEX) for _, labels in rows]),
    }


def _answer_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                   replacements: list[dict[str, Any]]) -> list[int]:
    """``ids`` where a token overlaps an answer span, else -100.

    offsets: each token's characters in the text the tokenizer saw, where the processor had
    replaced each ``<image>`` by a run of image tokens; replacements: those replacements
    (``span`` in the rendered text, ``new_span`` in the tokenized one). Tokens without
    characters (``<s>``, padding) overlap nothing.
    """
    def moved(char: int) -> int:
        return char + sum(r["new_span"][1] - r["span"][1] for r in replacements if r["span"][1] <= char)

    answers = [(moved(start), moved(end)) for start, end in spans]
    return [token if any(a < end and b > start for start, end in answers) else IGNORE_INDEX
            for token, (a, b) in zip(ids, offsets)]


def _truncate(ids: list[int], labels: list[int], max_length: int | None, side: str,
              image_token_id: int, example_id: str) -> tuple[list[int], list[int]]:
    """``ids`` and ``labels`` cut to ``max_length`` on ``side`` ("left" or "right")."""
    if max_length is None or len(ids) <= max_length:
        return ids, labels
    keep = slice(len(ids) - max_length, None) if side == "left" else slice(0, max_length)
    if (kept := ids[keep].count(image_token_id)) < (total := ids.count(image_token_id)):
        raise TokensieveError(f"example {example_id}: max_length {max_length} would cut its image tokens "
                              f"({kept} of {total} kept, {len(ids)} tokens in all)")
    return ids[keep], labels[keep]


def _pad(row: list[int], value: int, width: int, left: bool) -> list[int]:
    fill = [value] * (width - len(row))
    return fill + row if left else row + fill


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every record, ``where`` naming the file and the list entry or line."""
    if not path.is_file():
        raise TokensieveError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokensieveError(f"{path} is not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            rows = [(f"{path} entry {i}", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            raise TokensieveError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    else:
        rows = []
        for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise TokensieveError(f"{path} line {n}: not valid JSON ({err.msg})") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise TokensieveError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return rows


def _example(row: dict[str, Any], where: str, image_folder: Path) -> InstructExample:
    if "id" not in row:
        raise TokensieveError(f"{where}: missing field 'id'")
    where = f"{where} (id {row['id']})"
    for key in ("image", "conversations"):
        if key not in row:
            raise TokensieveError(f"{where}: missing field {key!r}")
    name = row["image"]
    if not isinstance(name, str):
        raise TokensieveError(f"{where}: field 'image' must be a file name, got {type(name).__name__}")
    turns = _turns(row["conversations"], where)
    image = image_folder / name
    if not image.is_file():
        raise TokensieveError(f"{where}: image {name} not found in {image_folder}")
    return InstructExample.from_file(str(row["id"]), turns, image)


def _turns(conversation: Any, where: str) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of a checked conversation, the image marker taken out."""
    if not isinstance(conversation, list) or not conversation:
        raise TokensieveError(f"{where}: field 'conversations' must be a non-empty list")
    values = []
    for k, message in enumerate(conversation):
        if not (isinstance(message, dict) and "from" in message and isinstance(message.get("value"), str)):
            raise TokensieveError(f"{where}: conversations[{k}] must be an object with 'from' and a string 'value'")
        if message["from"] != ROLES[k % 2]:
            raise TokensieveError(f"{where}: conversations[{k}] is from {message['from']!r}, expected "
                                  f"{ROLES[k % 2]!r} (messages alternate human, gpt, starting with human)")
        values.append(message["value"])
    if len(values) % 2:
        raise TokensieveError(f"{where}: the conversation ends on a human message without a gpt answer")
    found = [k for k, value in enumerate(values) for _ in range(value.count(IMAGE_MARKER))]
    if found != [0]:
        places = ", ".join(f"conversations[{k}]" for k in found)
        raise TokensieveError(f"{where}: the {IMAGE_MARKER} marker must appear exactly once, in the first "
                              f"human message; found {len(found)}" + (f" (in {places})" if found else ""))
    values[0] = values[0].replace(IMAGE_MARKER, "").strip()
    return list(zip(values[::2], values[1::2]))


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path))
