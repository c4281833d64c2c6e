"""Which images or rows share a method's call (tokensieve/backbones/call_runs.py): consecutive ones of one
size on an accelerator, each alone on a CPU unless BATCH_ON_CPU says otherwise."""

from __future__ import annotations

import torch

from tokensieve.backbones import call_runs

SIZES = [("image", 48), ("image", 48), ("image", 80), ("video", 80), ("image", 48), ("image", 48)]


def test_consecutive_ones_of_one_size_share_a_call_on_an_accelerator():
    assert call_runs.call_runs(SIZES, torch.device("cuda")) == [[0, 1], [2], [3], [4, 5]]


def test_each_goes_alone_on_a_cpu(monkeypatch):
    assert call_runs.call_runs(SIZES, torch.device("cpu")) == [[i] for i in range(len(SIZES))]
    monkeypatch.setattr(call_runs, "BATCH_ON_CPU", True)
    assert call_runs.call_runs(SIZES, torch.device("cpu")) == [[0, 1], [2], [3], [4, 5]]
    assert call_runs.call_runs([], torch.device("cpu")) == []
