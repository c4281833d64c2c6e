"""What the lmms-eval tests share: a local ``generate_until`` task's YAML, lmms-eval's own entry run on
our tasks only (not lmms-eval's 3,000), and the answers an adapter's own ``generate`` gives."""

from __future__ import annotations

from pathlib import Path

import lmms_eval.evaluator
from PIL import Image

TASK = ("task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n"
        "doc_to_visual: !function utils.{visual}\ndoc_to_text: !function utils.doc_to_text\n"
        "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs: {{max_new_tokens: {max_new_tokens}, until: ['</s>'], do_sample: false}}\n"
        "metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]\n")


def evaluate(task_dir: Path, task: str, model_args: str) -> dict:
    """lmms-eval's own entry, the model by its registered name, task ``task`` of ``task_dir`` only."""
    from lmms_eval.tasks import TaskManager

    return lmms_eval.evaluator.simple_evaluate(
        model="tokensieve", model_args=model_args, tasks=[task], batch_size=2,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))


def direct_answers(backbone, prompts: list[tuple[list[Image.Image], str]], handle, max_new_tokens: int) -> list[str]:
    """Each prompt's answer from ``backbone.generate`` alone (greedy, ``max_new_tokens``), a prompt its
    images and its text, with ``handle`` attached (detached after)."""
    try:
        answers = []
        for images, text in prompts:
            batch = backbone.processor(images=images, text=[text], return_tensors="pt")
            new = backbone.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            answers.append(backbone.processor.tokenizer.decode(new[0], skip_special_tokens=True).strip())
    finally:
        handle.detach()
    return answers
