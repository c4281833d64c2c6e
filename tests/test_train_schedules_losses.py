"""Training schedules (temperature, warm-up, curriculum) and the pruner's losses, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokensieve.errors import TokensieveError
from tokensieve.train.losses import (adversarial_loss, answer_cross_entropy, discriminator_loss, distillation_kl,
                                     hidden_state_mse, target_ratio_sparsity)
from tokensieve.train.schedules import lr_factor_at, target_ratio_at, temperature_at, warmup_weight_at

# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_temperature_endpoints_and_monotone(kind):
    values = [temperature_at(s, 100, start=5.0, end=0.1, kind=kind) for s in range(101)]
    assert values[0] == pytest.approx(5.0)
    assert values[100] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values, values[1:]))


def test_exponential_is_geometric_and_linear_is_arithmetic():
    assert temperature_at(50, 100, start=4.0, end=1.0, floor=0.0) == pytest.approx(2.0)  # sqrt(4 * 1)
    assert temperature_at(50, 100, start=4.0, end=1.0, kind="linear", floor=0.0) == pytest.approx(2.5)


def test_temperature_holds_after_the_anneal_fraction():
    held = [temperature_at(s, 100, start=5.0, end=0.5, anneal_fraction=0.4) for s in (40, 41, 70, 100)]
    assert held == pytest.approx([0.5] * 4)
    assert temperature_at(39, 100, start=5.0, end=0.5, anneal_fraction=0.4) > 0.5


def test_temperature_never_below_floor():
    values = [temperature_at(s, 100, start=5.0, end=0.01, floor=0.2) for s in range(101)]
    assert min(values) == pytest.approx(0.2)
    assert values[0] == pytest.approx(5.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "cosine"}, "unknown temperature schedule 'cosine'"),
    ({"start": 0.0}, "temperatures must be > 0"),
    ({"end": -1.0}, "temperatures must be > 0"),
    ({"anneal_fraction": 1.5}, r"anneal_fraction 1.5 is not in \[0, 1\]"),
])
def test_temperature_bad_arguments(kwargs, match):
    with pytest.raises(TokensieveError, match=match):
        temperature_at(0, 10, **kwargs)


def test_warmup_is_zero_then_weight():
    values = [warmup_weight_at(s, 100, weight=0.7, warmup_fraction=0.2) for s in range(100)]
    assert values[:20] == [0.0] * 20
    assert values[20:] == [0.7] * 80
    assert warmup_weight_at(0, 100, weight=0.7, warmup_fraction=0.0) == 0.7


def test_cosine_learning_rate_falls_from_one_to_its_floor_and_constant_stays():
    factors = [lr_factor_at(step, 100, "cosine", floor=0.1) for step in range(101)]
    assert factors[0] == 1.0 and factors[100] == pytest.approx(0.1) and factors[50] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert {lr_factor_at(step, 100) for step in range(101)} == {1.0}
    with pytest.raises(TokensieveError, match="learning-rate schedule 'step'"):
        lr_factor_at(0, 100, "step")
    with pytest.raises(TokensieveError, match="floor 2"):
        lr_factor_at(0, 100, "cosine", floor=2)


def test_curriculum_endpoints_and_hold():
    values = [target_ratio_at(s, 100, target=0.25, curriculum_fraction=0.5) for s in range(101)]
    assert values[0] == pytest.approx(1.0)
    assert values[25] == pytest.approx(0.625)
    assert values[50:] == pytest.approx([0.25] * 51)
    assert all(a > b for a, b in zip(values[:51], values[1:51]))
    assert target_ratio_at(0, 100, target=0.25, curriculum_fraction=0.5, start=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("target", [0.0, 1.5])
def test_curriculum_target_must_be_a_ratio(target):
    with pytest.raises(TokensieveError, match="target keep ratio"):
        target_ratio_at(0, 10, target=target, curriculum_fraction=0.5)


# --- losses ------------------------------------------------------------------------------------

B, L, V = 2, 6, 11


def _labels() -> torch.Tensor:
    """Answers at positions 3-4 of sample 0 and 5 of sample 1; everything else ignored."""
    labels = torch.full((B, L), -100)
    labels[0, 3], labels[0, 4], labels[1, 5] = 2, 7, 9
    return labels


def test_cross_entropy_matches_the_shifted_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(B, L, V)
    picked = torch.stack([logits[0, 2], logits[0, 3], logits[1, 4]])  # the positions predicting the answers
    expected = F.cross_entropy(picked, torch.tensor([2, 7, 9]))
    assert answer_cross_entropy(logits, _labels()) == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_ignores_non_answer_positions():
    torch.manual_seed(1)
    logits = torch.randn(B, L, V)
    changed = logits.clone()
    changed[0, 4], changed[1, :4], changed[1, 5] = 50.0, -30.0, 9.0  # none of these predict an answer token
    assert answer_cross_entropy(changed, _labels()) == pytest.approx(answer_cross_entropy(logits, _labels()).item())
    changed[0, 2, 2] += 5.0  # this one predicts labels[0, 3] = 2
    assert answer_cross_entropy(changed, _labels()) < answer_cross_entropy(logits, _labels())


def test_losses_need_an_answer_label():
    logits = torch.randn(B, L, V)
    no_answer = torch.full((B, L), -100)
    no_answer[:, 0] = 1  # position 0 is never predicted
    with pytest.raises(TokensieveError, match="no answer labels"):
        answer_cross_entropy(logits, no_answer)
    with pytest.raises(TokensieveError, match="no answer labels"):
        distillation_kl(logits, logits, no_answer)


def test_kl_zero_for_identical_logits_positive_otherwise():
    torch.manual_seed(2)
    teacher = torch.randn(B, L, V)
    assert distillation_kl(teacher.clone(), teacher, _labels()).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(teacher + 0.5 * torch.randn(B, L, V), teacher, _labels()).item() > 1e-3


def test_kl_matches_hand_computation_with_temperature():
    torch.manual_seed(3)
    student, teacher, t = torch.randn(B, L, V), torch.randn(B, L, V), 2.0
    rows = [(0, 2), (0, 3), (1, 4)]
    per_position = []
    for b, i in rows:
        p = F.softmax(teacher[b, i] / t, -1)
        q = F.softmax(student[b, i] / t, -1)
        per_position.append((p * (p.log() - q.log())).sum())
    expected = torch.stack(per_position).mean() * t**2
    assert distillation_kl(student, teacher, _labels(), temperature=t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_ignores_non_answer_positions_and_gives_teacher_no_gradient():
    torch.manual_seed(4)
    teacher = torch.randn(B, L, V, requires_grad=True)
    student = teacher.detach().clone()
    student[0, 0], student[1, 5], student[0, 5] = 20.0, -20.0, 3.0  # positions predicting no answer
    student.requires_grad_(True)
    loss = distillation_kl(student, teacher, _labels())
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_sparsity_is_zero_at_target_and_ignores_invalid_tokens():
    keep = torch.tensor([[0.2, 0.4, 0.9], [0.6, 0.0, 1.0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    assert target_ratio_sparsity(keep, valid, 0.4).item() == pytest.approx(0.0, abs=1e-7)  # mean(0.2, 0.4, 0.6)
    assert target_ratio_sparsity(keep, valid, 0.1).item() == pytest.approx(0.09)
    changed = keep.clone()
    changed[~valid] = torch.tensor([0.0, 1.0, 0.0])
    assert target_ratio_sparsity(changed, valid, 0.1).item() == pytest.approx(0.09)


def test_sparsity_rejects_a_non_bool_mask_and_no_valid_tokens():
    keep = torch.rand(2, 3)
    with pytest.raises(TokensieveError, match="bool"):
        target_ratio_sparsity(keep, torch.ones(2, 3), 0.5)
    with pytest.raises(TokensieveError, match="no valid visual tokens"):
        target_ratio_sparsity(keep, torch.zeros(2, 3, dtype=torch.bool), 0.5)


def test_hidden_state_mse_over_masked_positions_only():
    student = torch.zeros(2, 3, 4)
    teacher = torch.zeros(2, 3, 4)
    teacher[0, 1] = 2.0  # masked in: squared error 4 on 4 values
    teacher[1, 2] = 100.0  # masked out
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert hidden_state_mse(student, teacher, mask).item() == pytest.approx(4 * 4 / (3 * 4))


def test_hidden_state_mse_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(TokensieveError, match="mask has shape"):
        hidden_state_mse(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


def _bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def test_discriminator_and_adversarial_losses_match_hand_bce():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.3, -1.5])
    real_term = (_bce(2.0, 1) + _bce(-0.5, 1)) / 2
    fake_term = (_bce(0.3, 0) + _bce(-1.5, 0)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx((real_term + fake_term) / 2, rel=1e-6)
    assert adversarial_loss(fake).item() == pytest.approx((_bce(0.3, 1) + _bce(-1.5, 1)) / 2, rel=1e-6)


def test_discriminator_logits_must_be_one_per_sample():
    with pytest.raises(TokensieveError, match=r"fake_logits must be \(B,\)"):
        adversarial_loss(torch.zeros(2, 1))
