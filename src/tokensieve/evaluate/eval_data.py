"""What ``tokensieve eval`` scores: held-out synthetic questions, or a real VQA set from files.

Every source becomes the same :class:`EvalData`: a list of :class:`~tokensieve.data.vqa_files.VQAItem`
(question, reference answers, family, lazily read image), how many tokens an answer may take,
and, for the synthetic set only, the scenes behind the items (the object oracle needs them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokensieve.backbones import LlavaBackbone
from tokensieve.data.synthetic import Sample
from tokensieve.data.synthetic_eval import heldout_samples, scene_spec_for
from tokensieve.data.vqa_files import VQAItem, load_hf_dataset, load_llava_eval, load_spec
from tokensieve.errors import TokensieveError

# Real VQA answers are a word or a short phrase (LLaVA's VQA prompts ask for one); the testbed's are one token.
REAL_ANSWER_TOKENS = 16


@dataclass
class EvalData:
    """Items to score and how to answer them.

    name: what the items are, for the report and the resume fingerprint.
    max_new_tokens: 1 scores the greedy first token (one-word answers); more generates.
    scenes: synthetic only: the scene of each item by ``question_id`` (None for real data).
    """

    items: list[VQAItem]
    name: str
    max_new_tokens: int
    scenes: dict[str, Sample] | None = field(default=None, repr=False)


def synthetic_data(backbone: LlavaBackbone, n: int, max_new_tokens: int | None = None, skip: int = 0) -> EvalData:
    """``n`` held-out synthetic samples after the first ``skip`` (items ``skip .. skip + n - 1``;
    a ``skip`` of at least the default 500 gives a set apart from the one reports use), drawn at
    the model's image and patch size; answered in one token unless ``max_new_tokens`` says otherwise."""
    samples = heldout_samples(skip + n, spec=scene_spec_for(backbone))[skip:]
    items = [VQAItem(str(s.index), s.question, [s.answer], s.family, read_image=lambda s=s: s.image)
             for s in samples]
    name = f"synthetic held-out, {n} samples" + (f" from item {skip}" if skip else "")
    return EvalData(items, name, max_new_tokens or 1, {str(s.index): s for s in samples})


def file_data(questions: Path | None = None, images: Path | None = None, answers: Path | None = None,
              dataset: Path | None = None, spec: Path | None = None, limit: int | None = None,
              max_new_tokens: int | None = None, skip: int = 0) -> EvalData:
    """A real set: LLaVA evaluation files (``questions`` JSONL + ``images`` folder + ``answers``)
    or a Hugging Face dataset on disk (``dataset`` + a ``spec`` YAML mapping its columns);
    after the first ``skip`` items, the next ``limit`` when given, answered in up to
    ``max_new_tokens`` tokens (default ``REAL_ANSWER_TOKENS``). Every item must have reference
    answers."""
    if dataset is not None:
        if questions is not None or images is not None or answers is not None:
            raise TokensieveError("give either --dataset with --spec, or --questions/--images/--answers, not both")
        if spec is None:
            raise TokensieveError("--dataset needs --spec, a YAML mapping of image/question/answers columns")
        items, name = load_hf_dataset(dataset, load_spec(spec)), f"dataset {dataset}"
    else:
        if spec is not None:
            raise TokensieveError("--spec goes with --dataset")
        if questions is None or images is None or answers is None:
            raise TokensieveError("a real VQA set needs --questions FILE, --images FOLDER and --answers FILE")
        items, name = load_llava_eval(questions, images, answers), f"questions {questions}"
    if skip:
        if skip >= len(items):
            raise TokensieveError(f"--skip {skip} leaves none of the {len(items)} items of {name}")
        items, name = items[skip:], f"{name}, from item {skip}"
    if limit is not None:
        items, name = items[:limit], f"{name}, first {limit}"
    if not items:
        raise TokensieveError(f"{name} holds no questions")
    return EvalData(items, name, max_new_tokens or REAL_ANSWER_TOKENS)
