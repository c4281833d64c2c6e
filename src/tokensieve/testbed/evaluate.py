"""How well the testbed answers, and whether it is fit to rank pruning methods.

Besides plain accuracy, the report holds the controls that show the model really uses its
visual tokens: a question-only prior, a blank image, a random 11% of tokens, only the
object tokens, and where the tower's attention falls: on LLaVA the CLS token's (a target), on the
Qwen testbed, which has no CLS token, the attention each token receives in the last block (reported: the
signal VisionZip's Qwen port ranks by). The Qwen testbed is checked instead for rows of different token
counts (its scenes come in four sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.data.synthetic import Sample, SceneSpec, blank_image
from tokensieve.data.synthetic_eval import (
    heldout_samples, object_attention_ratio, object_keep, question_only_predictor, random_keep, scene_spec_for,
)
from tokensieve.evaluate.predict import predict
from tokensieve.evaluate.scoring import accuracy_summary
from tokensieve.errors import TokensieveError
from tokensieve.testbed.qwen_model import QWEN_SCENES, TOKEN_PIXELS
from tokensieve.testbed.received_attention import recorded_received_attention

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
CLS_TARGET = "cls_attention_object_ratio >= 2"
# The Qwen testbed: no CLS; n_visual_tokens is its largest size's count, and sizes must differ.
QWEN_TARGETS: dict[str, Callable[[dict], bool]] = {
    **{name: check for name, check in TARGETS.items() if name != CLS_TARGET},
    "visual token counts differ across image sizes": lambda r: len(set(r["visual_tokens_per_size"].values())) > 1,
}


def summarise(samples: list[Sample], predictions: list[str]) -> dict:
    """Overall and per-family exact-match accuracy."""
    return accuracy_summary([s.family for s in samples], [float(s.answer == p) for s, p in zip(samples, predictions)])


def qwen_scenes(backbone: QwenVLBackbone) -> SceneSpec:
    """The Qwen testbed's scenes, refused for a Qwen model whose visual token is not a TOKEN_PIXELS square."""
    vc = backbone.config.vision_config
    if vc.patch_size * vc.spatial_merge_size != TOKEN_PIXELS:
        raise TokensieveError(f"not a Qwen testbed: its visual tokens cover {vc.patch_size * vc.spatial_merge_size} "
                              f"px, the testbed's scenes {TOKEN_PIXELS} px")
    return QWEN_SCENES


def evaluate_testbed(backbone: LlavaBackbone | QwenVLBackbone, n_samples: int = 1000, batch_size: int = 64,
                     progress: bool = True) -> dict:
    """All testbed metrics on ``n_samples`` held-out samples, with the targets checked.

    The question-only prior is estimated from ``10 * n_samples`` training questions.
    """
    if backbone.processor is None:
        raise ValueError("the testbed evaluation needs the model's processor")
    qwen = isinstance(backbone, QwenVLBackbone)
    spec = qwen_scenes(backbone) if qwen else scene_spec_for(backbone)
    samples = heldout_samples(n_samples, spec=spec)
    label = (lambda text: text) if progress else (lambda text: None)

    if qwen:
        sizes = {f"{h}x{w}": spec.at(h, w).n_patches for h, w in spec.sizes}
        with recorded_received_attention(backbone) as received:
            full = summarise(samples, predict(backbone, samples, batch_size=batch_size, desc=label("full model")))
        n_tokens = max(sizes.values())
        extra = {"visual_tokens_per_size": sizes,
                 "received_attention_object_ratio": round(object_attention_ratio(received, samples), 3)}
    else:
        n_tokens = backbone.n_visual_tokens
        with backbone.capture_cls_attention(-1) as captured:
            full = summarise(samples, predict(backbone, samples, batch_size=batch_size, desc=label("full model")))
        extra = {"cls_attention_object_ratio": round(object_attention_ratio(torch.cat(captured), samples), 3)}
    blank = {size: blank_image(spec.at(*size)) for size in {s.image.shape[:2] for s in samples}}
    blanks = [replace(s, image=blank[s.image.shape[:2]]) for s in samples]
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
            backbone, samples, random_keep(0.11, None if qwen else n_tokens), batch_size,
            label("random 11%")))["accuracy"],
        "object_keep_accuracy": summarise(samples, predict(
            backbone, samples, object_keep, batch_size, label("object tokens only")))["accuracy"],
        **extra,
    }
    report["targets"] = {name: check(report) for name, check in (QWEN_TARGETS if qwen else TARGETS).items()}
    return report
