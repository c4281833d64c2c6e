"""``tokensieve ask``: one question about one image, answered unpruned and, with a method, pruned.

The image is a file, or a held-out synthetic scene (``--scene N``, written to a PNG with
``--save-scene``) whose own question and gold answer come with it. With ``--method`` the answer
is given twice, unpruned and pruned, with the visual tokens each stage kept, and
``--show-kept`` draws the kept patches on the image the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tokensieve.backbones import LlavaBackbone
from tokensieve.errors import TokensieveError

# A testbed checkpoint (trained by tokensieve on one-word answers, never taught to stop) carries
# this file; its answer is its first token. Other models generate until their end token.
TESTBED_MARK = "testbed_training.json"
GENERATED_ANSWER_TOKENS = 32
ZOOM = 4  # the testbed sees 80 px: enlarged (pixels kept sharp) so patches can be told apart


@dataclass
class Question:
    """What is asked: the image (PIL, RGB), the question, and the gold answer when known."""

    image: Image.Image
    question: str
    gold: str | None = None


def scene_question(backbone: LlavaBackbone, index: int, question: str | None, save: Path | None) -> Question:
    """Held-out synthetic scene ``index`` at the model's image size (written to ``save`` as PNG);
    ``question`` replaces the scene's own, whose gold answer is then unknown."""
    from tokensieve.data.synthetic_eval import heldout_samples, scene_spec_for

    sample = heldout_samples(index + 1, spec=scene_spec_for(backbone))[index]
    image = Image.fromarray(sample.image)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        image.save(save)
    return Question(image, question or sample.question, None if question else sample.answer)


def answer_tokens(model: str | Path | None, requested: int | None) -> int:
    """New tokens to generate: ``requested``, else 1 for a testbed checkpoint, else up to 32."""
    if requested is not None:
        return requested
    from tokensieve.backbones.shipped import shipped_testbed

    folder = Path(model) if model is not None else shipped_testbed()
    return 1 if (folder / TESTBED_MARK).is_file() else GENERATED_ANSWER_TOKENS


def answer(backbone: LlavaBackbone, batch: dict, max_new_tokens: int) -> str:
    """The greedy answer to one prepared prompt, stopped at the end token or ``max_new_tokens``."""
    tokenizer = backbone.processor.tokenizer
    new = backbone.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()


def save_kept(backbone: LlavaBackbone, image: Image.Image, kept: dict, path: Path) -> None:
    """The model's view of ``image``, then the same once per stage with dropped patches faded (PNG).

    kept: ``{stage: (1, keep)}`` patch indices, as :attr:`tokensieve.attach.Handle.last_kept`.
    """
    from tokensieve.data.vqa_files import VQAItem
    from tokensieve.evaluate.kept_overlays import example_views, fade_dropped

    view = example_views(backbone, [VQAItem("ask", "", [], read_image=lambda: np.asarray(image))])[0].image
    panels = [view] + [fade_dropped(view, [indices[0].tolist()], backbone.patch_grid) for indices in kept.values()]
    gap = np.full((view.shape[0], 4, 3), 255, dtype=np.uint8)
    strip = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(strip)
    picture.resize((picture.width * ZOOM, picture.height * ZOOM), Image.Resampling.NEAREST).save(path)


def ask(question: Question, backbone: LlavaBackbone, max_new_tokens: int, method: str | None = None,
        budget: str | None = None, site: str | None = None, mode: str = "hard",
        show_kept: Path | None = None) -> list[str]:
    """The lines ``tokensieve ask`` prints: question, unpruned answer, then (with ``method``) the
    pruned answer and each stage's kept tokens, and the gold answer when known."""
    from tokensieve.attach import attach
    from tokensieve.backbones.llava_prompt import prompt

    if backbone.processor is None:
        raise TokensieveError("the model has no processor files; cannot prepare the image and question")
    batch = backbone.processor(images=[question.image], text=[prompt(question.question)], return_tensors="pt")
    lines = [f"question: {question.question}", f"answer (unpruned): {answer(backbone, batch, max_new_tokens)}"]
    if method is not None:
        handle = attach(backbone, method, budget, site=site, mode=mode)
        try:
            pruned = answer(backbone, batch, max_new_tokens)
            kept = dict(handle.last_kept)
            counts = dict(handle.last_counts)
        finally:
            handle.detach()
        lines.append(f"answer ({mode}, {', '.join(counts)}): {pruned}")
        lines += [f"  {stage}: {after} of {before} visual tokens kept" for stage, (before, after) in counts.items()]
        if show_kept is not None:
            save_kept(backbone, question.image, kept, show_kept)
            lines.append(f"kept tokens pictured in {show_kept} (the image, then each stage; dropped patches dim)")
    if question.gold is not None:
        lines.append(f"gold answer: {question.gold}")
    return lines
