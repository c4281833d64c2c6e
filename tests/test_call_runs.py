"""Which images or rows share a method's call (tokensieve/backbones/call_runs.py): consecutive ones of one
size on an accelerator, each alone on a CPU unless BATCH_ON_CPU says otherwise; and the fields of such a
run (tokensieve/backbones/per_image_stage.py)."""

from __future__ import annotations

import torch

from tokensieve.backbones import call_runs
from tokensieve.backbones.per_image_stage import row_of, stacked_fields
from tokensieve.method import Selection

SIZES = [("image", 48), ("image", 48), ("image", 80), ("video", 80), ("image", 48), ("image", 48)]


def test_consecutive_ones_of_one_size_share_a_call_on_an_accelerator():
    assert call_runs.call_runs(SIZES, torch.device("cuda")) == [[0, 1], [2], [3], [4, 5]]


def test_each_goes_alone_on_a_cpu(monkeypatch):
    assert call_runs.call_runs(SIZES, torch.device("cpu")) == [[i] for i in range(len(SIZES))]
    monkeypatch.setattr(call_runs, "BATCH_ON_CPU", True)
    assert call_runs.call_runs(SIZES, torch.device("cpu")) == [[0, 1], [2], [3], [4, 5]]
    assert call_runs.call_runs([], torch.device("cpu")) == []


def test_the_fields_of_a_run_are_its_images_fields_stacked():
    """Signals one row per image, questions padded before their start (as LLaVA-1.5 gives them), texts and
    units in order; a run's selection split back into one per image."""
    def fields(i: int, length: int) -> dict:
        question = torch.full((1, length, 4), i + 1.0), torch.ones(1, length, dtype=torch.bool)
        return {"signals": {"keys": lambda: torch.full((1, 3, 2), float(i))}, "question_states": lambda: question,
                "question_text": lambda: [f"question {i}"], "units": [[f"unit {i}"]]}

    run = stacked_fields([fields(0, 2), fields(1, 3)])
    assert run["signals"]["keys"]().tolist() == [[[0.0] * 2] * 3, [[1.0] * 2] * 3]
    states, valid = run["question_states"]()
    assert valid.tolist() == [[False, True, True], [True, True, True]]
    assert states[:, :, 0].tolist() == [[0.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert run["question_text"]() == ["question 0", "question 1"] and run["units"] == [["unit 0"], ["unit 1"]]
    sel = Selection(torch.tensor([[0, 2], [1, 2]]), valid=torch.tensor([[True, False], [True, True]]))
    second = row_of(sel, 1)
    assert second.indices.tolist() == [[1, 2]] and second.valid.tolist() == [[True, True]] and second.tokens is None
