"""The visual-position loss of the Qwen testbed's stage 2: its targets name every image token's
place in its own grid, its gradient reaches only those tokens at the chosen layer, and a layer
after the mention lookups is refused."""

from __future__ import annotations

import pytest
import torch

import tokensieve.testbed.train as train_module
from tokensieve.backbones.qwen_prompt import encode
from tokensieve.data.synthetic import make_sample
from tokensieve.errors import TokensieveError
from tokensieve.testbed.position_probe import VisualPositionProbe, visual_position_targets
from tokensieve.testbed.qwen_family import SYSTEM, QwenTestbed
from tokensieve.testbed.qwen_model import QWEN_SCENES

from tiny_testbed import TINY


def _qwen_batch(n: int = 6):
    testbed = QwenTestbed()
    _, processor = testbed.build(TINY["size"])
    samples = [make_sample(0, i, QWEN_SCENES) for i in range(n)]
    return testbed, processor, samples, encode(processor, samples, SYSTEM)


def test_targets_are_every_image_token_with_its_row_and_column_in_its_own_grid():
    testbed, processor, samples, batch = _qwen_batch()
    targets = testbed.visual_positions(processor, batch)
    ids = batch["input_ids"]
    assert (ids[targets[:, 0], targets[:, 1]] == processor.image_token_id).all()
    assert len(targets) == int((ids == processor.image_token_id).sum())
    for b, sample in enumerate(samples):
        rows = targets[targets[:, 0] == b]
        height, width = sample.grid
        # Row-major: the k-th image token of the row is at (k // width, k % width).
        k = torch.arange(height * width)
        assert torch.equal(rows[:, 2], k // width) and torch.equal(rows[:, 3], k % width)
    assert len({s.grid for s in samples}) > 1  # rows of different grids in one batch


def test_a_grid_that_does_not_match_the_image_tokens_is_refused():
    _, processor, samples, batch = _qwen_batch(2)
    with pytest.raises(ValueError, match="row 0 has .* image tokens"):
        visual_position_targets(batch["input_ids"], processor.image_token_id, [(3, 3), (3, 3)])


def test_the_loss_reaches_only_the_visual_tokens_at_its_layer():
    testbed, processor, _, batch = _qwen_batch()
    targets = testbed.visual_positions(processor, batch)
    length = batch["input_ids"].shape[1]
    hidden = [torch.randn(len(batch["input_ids"]), length, 8, requires_grad=True) for _ in range(4)]
    probe = VisualPositionProbe(8, QWEN_SCENES.grid, layer=2)
    loss, stats = probe.loss(tuple(hidden), targets)
    loss.backward()
    touched = {tuple(p) for p in hidden[2].grad.abs().sum(-1).nonzero().tolist()}
    assert touched == {(b, p) for b, p in targets[:, :2].tolist()}
    assert all(h.grad is None for k, h in enumerate(hidden) if k != 2)
    assert set(stats) == {"row_acc", "col_acc"} and all(0 <= v <= 1 for v in stats.values())


def test_a_position_layer_after_the_mention_lookups_is_refused():
    with pytest.raises(TokensieveError, match="position_layer 2 must satisfy .* mention_layer \\(1\\)"):
        train_module.TestbedTrainConfig(**{**TINY, "backbone": "qwen", "position_layer": 2})
