"""How well the testbed answers, and whether it is fit to rank pruning methods.

Besides plain accuracy, the report holds the controls that show the model really uses its
visual tokens: a question-only prior, a blank image, a random 11% of tokens, only the
object tokens, and where the tower's CLS attention falls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from tokensieve.backbones import LlavaBackbone
from tokensieve.data.synthetic import Sample, blank_image
from tokensieve.data.synthetic_eval import (
    cls_attention_object_ratio, heldout_samples, object_keep, question_only_predictor, random_keep, scene_spec_for,
)
from tokensieve.evaluate.predict import predict
from tokensieve.evaluate.scoring import accuracy_summary

# Targets from the foundation issue: what makes the testbed able to rank pruning methods.
TARGETS: dict[str, Callable[[dict], bool]] = {
    "accuracy >= 0.90": lambda r: r["accuracy"] >= 0.90,
    "blank_image_accuracy <= question_only_accuracy + 0.05":
        lambda r: r["blank_image_accuracy"] <= r["question_only_accuracy"] + 0.05,
    "random_keep_11_accuracy <= 0.8 x accuracy": lambda r: r["random_keep_11_accuracy"] <= 0.8 * r["accuracy"],
    "object_keep_accuracy >= 0.90 x accuracy": lambda r: r["object_keep_accuracy"] >= 0.9 * r["accuracy"],
    "cls_attention_object_ratio >= 2": lambda r: r["cls_attention_object_ratio"] >= 2,
    "n_visual_tokens >= 100": lambda r: r["n_visual_tokens"] >= 100,
}


def summarise(samples: list[Sample], predictions: list[str]) -> dict:
    """Overall and per-family exact-match accuracy."""
    return accuracy_summary([s.family for s in samples], [float(s.answer == p) for s, p in zip(samples, predictions)])


def evaluate_testbed(backbone: LlavaBackbone, n_samples: int = 1000, batch_size: int = 64,
                     progress: bool = True) -> dict:
    """All testbed metrics on ``n_samples`` held-out samples, with the targets checked.

    The question-only prior is estimated from ``10 * n_samples`` training questions.
    """
    if backbone.processor is None:
        raise ValueError("the testbed evaluation needs the model's processor")
    spec = scene_spec_for(backbone)
    samples = heldout_samples(n_samples, spec=spec)
    n_tokens = backbone.n_visual_tokens
    label = (lambda text: text) if progress else (lambda text: None)

    with backbone.capture_cls_attention(-1) as captured:
        full = summarise(samples, predict(backbone, samples, batch_size=batch_size, desc=label("full model")))
    cls_ratio = cls_attention_object_ratio(torch.cat(captured), samples)
    blank = blank_image(spec)
    blanks = [replace(s, image=blank) for s in samples]
    guess = question_only_predictor(10 * n_samples, spec)
    report = {
        "n_samples": n_samples,
        "accuracy": full["accuracy"],
        "per_family": full["per_family"],
        "question_only_accuracy": summarise(samples, [guess(s) for s in samples])["accuracy"],
        "blank_image_accuracy": summarise(samples, predict(backbone, blanks, batch_size=batch_size,
                                                           desc=label("blank image")))["accuracy"],
        "n_visual_tokens": n_tokens,
        "random_keep_11_accuracy": summarise(samples, predict(
            backbone, samples, random_keep(0.11, n_tokens), batch_size, label("random 11%")))["accuracy"],
        "object_keep_accuracy": summarise(samples, predict(
            backbone, samples, object_keep, batch_size, label("object tokens only")))["accuracy"],
        "cls_attention_object_ratio": round(cls_ratio, 3),
    }
    report["targets"] = {name: check(report) for name, check in TARGETS.items()}
    return report
