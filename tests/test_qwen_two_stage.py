"""The learned two-stage pruner on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: the token
merger at llm.0 (after the patch merger, per image), the heads inside the LLM (per row); one training
step in soft mode reaches only the parts, and the saved parts prune in hard mode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tiny_qwen import ROWS, inputs, kept_of
from tiny_two_stage import TINY_SETTINGS, step_leaving_the_backbone_alone, tiny_config

from tokensieve.attach import attach
from tokensieve.data.instruct import IGNORE_INDEX, InstructExample
from tokensieve.data.qwen_instruct import collate_qwen
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs
from tokensieve.pruner import TwoStagePruner
from tokensieve.train.trainer import TwoStageTrainer, after_first_answer

# LLaVA's tiny settings less the merger options Qwen-VL refuses (a question-aware merger, a radius on one grid)
SETTINGS = {**TINY_SETTINGS, "merger": {k: v for k, v in TINY_SETTINGS["merger"].items()
                                        if k not in ("variant", "diversity_radius")}}


def test_one_training_step_reaches_only_the_parts_and_hard_inference_runs(tiny_qwen_dir, tmp_path):
    trainer = TwoStageTrainer(tiny_config(tiny_qwen_dir, SETTINGS), tmp_path / "run", progress=False)
    assert trainer.parts.place.merger_site == "llm.0"
    row = step_leaving_the_backbone_alone(trainer)
    assert np.isfinite(row["loss"]) and row["sparsity"] > 0 and row["merge_sparsity"] > 0
    assert len(row["keep_ratio"]) == 2  # both heads ran over every row
    grads = {name: p.grad for name, p in trainer.parts.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if name.startswith("token_merger."))
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if name.startswith("layer_pruners."))

    trainer.parts.save_pretrained(tmp_path / "parts")
    qwen = trainer.backbone
    pruner = TwoStagePruner.from_pretrained(tmp_path / "parts", qwen)
    handle = pruner.attach(qwen, "hard")
    try:
        with torch.no_grad():
            mixed = inputs(qwen, ROWS)
            logits = qwen.forward(**mixed).logits
            answer = qwen.generate(**mixed, max_new_tokens=2, do_sample=False)
        assert [len(k) for k in kept_of(handle)] == [8, 3, 8]  # half of each image's 16, 6, 16 tokens
        _, first, second = handle.last_counts.values()  # the merger, then the heads: each a share of its row's tokens
        assert first[1] < first[0] and second[0] == first[1] and second[1] < second[0]
        assert torch.isfinite(logits).all() and answer.shape[0] == 2
    finally:
        handle.detach()


def test_collate_labels_the_answer_and_its_end_of_turn(qwen):
    image = np.zeros((112, 112, 3), dtype=np.uint8)
    examples = [InstructExample.from_array("a", [("what is the colour ?", "red")], image),
                InstructExample.from_array("b", [("what shape is left ?", "green circle")], image)]
    tokenizer = qwen.processor.tokenizer
    for label_eos, answers in [(True, ["red <|im_end|>", "green circle <|im_end|>"]), (False, ["red", "green circle"])]:
        batch = collate_qwen(qwen.processor, examples, qwen.system_prompt, label_eos=label_eos)
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
        labelled = [tokenizer.decode(ids[labels != IGNORE_INDEX]) for ids, labels in zip(batch["input_ids"],
                                                                                          batch["labels"])]
        assert labelled == answers
    with pytest.raises(TokensieveError, match="one question and answer per example") as caught:
        collate_qwen(qwen.processor, [InstructExample.from_array("c", [("a", "b"), ("c", "d")], image)])
    assert "\n" not in str(caught.value)


@dataclass
class SeesQuestion(Method):
    """Keeps every token; records the question states' count of each row (test only)."""

    name = "sees_question"
    stages = ("llm",)
    seen: list = None

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen.append(int(inputs.question()[1].sum()))
        b, n = inputs.tokens.shape[:2]
        return Selection(torch.arange(n).expand(b, n))


def test_methods_inside_the_llm_never_see_the_answers(qwen):
    image = np.zeros((112, 112, 3), dtype=np.uint8)
    batch = collate_qwen(qwen.processor, [InstructExample.from_array("a", [("what is the colour ?", "red")], image)],
                         qwen.system_prompt)
    seen = []
    handle = attach(qwen, SeesQuestion(seen=seen), 1.0, site="llm.1", mode="soft")
    try:
        with torch.no_grad():
            model_inputs = {k: v for k, v in batch.items() if k != "labels"}
            qwen.forward(**model_inputs)
            qwen.forward(**model_inputs, answer_mask=after_first_answer(batch["labels"]))
    finally:
        handle.detach()
    assert seen[0] - seen[1] == 2  # "red" and the end of turn


@pytest.mark.parametrize(("merger", "words"), [
    ({"variant": "question_aware"}, "question_aware reads the question's states at the merger"),
    ({"diversity_radius": 1.5}, "diversity_radius needs every image on one square patch grid"),
])
def test_merger_settings_qwen_cannot_take_are_refused_in_one_line(tiny_qwen_dir, qwen, merger, words):
    with pytest.raises(TokensieveError, match=words) as caught:
        TwoStagePruner(tiny_config(tiny_qwen_dir, SETTINGS, merger=merger), qwen)
    assert "\n" not in str(caught.value)
