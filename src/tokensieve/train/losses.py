"""Losses for training the learned pruner: pure functions on tensors.

Answer positions follow the Hugging Face causal convention: the logits at position ``t``
predict the label at ``t + 1``, and a label of ``IGNORE_INDEX`` (-100) marks a position
that is not part of the answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.errors import TokensieveError

IGNORE_INDEX = -100


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise TokensieveError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise TokensieveError(f"logits must be (B, L, V), got shape {tuple(logits.shape)}")
    _check_shape("labels", labels, tuple(logits.shape[:2]))


def _answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``labels`` ``(B, L)``: the mask ``(B, L-1)`` of logit positions that predict an answer token,
    and those targets ``(P,)``. Raises when no label is set."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if not bool(mask.any()):
        raise TokensieveError("no answer labels are set (every label is -100)")
    return mask, targets[mask]


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens: ``logits`` ``(B, L, V)``, ``labels`` ``(B, L)`` -> scalar."""
    _check_logits_labels(logits, labels)
    mask, targets = _answer_positions(labels)
    return F.cross_entropy(logits[:, :-1][mask].float(), targets)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` of the temperature-softened next-token distributions -> scalar.

    ``student_logits`` and ``teacher_logits`` ``(B, L, V)``; ``labels`` ``(B, L)`` picks the positions
    that predict answer tokens. Averaged over those positions and multiplied by ``temperature ** 2``
    (so gradients keep their scale). The teacher gets no gradient.
    """
    if temperature <= 0:
        raise TokensieveError(f"distillation temperature must be > 0, got {temperature}")
    _check_logits_labels(student_logits, labels)
    _check_shape("teacher_logits", teacher_logits, tuple(student_logits.shape))
    mask, _ = _answer_positions(labels)
    student = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)  # (P, V)
    teacher = F.log_softmax(teacher_logits.detach()[:, :-1][mask].float() / temperature, dim=-1)  # (P, V)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)  # (P,)
    return kl.mean() * temperature**2


def target_ratio_sparsity(keep_prob: torch.Tensor, valid: torch.Tensor, target: float) -> torch.Tensor:
    """``(mean keep probability - target) ** 2`` -> scalar, the mean taken over valid visual tokens only.

    ``keep_prob`` ``(B, N)`` in ``[0, 1]`` for the visual tokens; ``valid`` ``(B, N)`` bool marks real
    (not padding or already dropped) tokens.
    """
    if not 0 <= target <= 1:
        raise TokensieveError(f"sparsity target {target} is not in [0, 1]")
    if valid.dtype != torch.bool:
        raise TokensieveError(f"valid must be a bool mask, got {valid.dtype}")
    _check_shape("valid", valid, tuple(keep_prob.shape))
    if not bool(valid.any()):
        raise TokensieveError("no valid visual tokens to compute the sparsity loss on")
    return (keep_prob[valid].mean() - target) ** 2


def hidden_state_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of hidden states ``(B, L, d)`` over the positions where ``mask`` ``(B, L)`` is True -> scalar.

    The teacher gets no gradient.
    """
    _check_shape("teacher", teacher, tuple(student.shape))
    if mask.dtype != torch.bool:
        raise TokensieveError(f"mask must be a bool mask, got {mask.dtype}")
    _check_shape("mask", mask, tuple(student.shape[:2]))
    if not bool(mask.any()):
        raise TokensieveError("the hidden-state mask selects no positions")
    return F.mse_loss(student[mask].float(), teacher.detach()[mask].float())


def _bce_towards(logits: torch.Tensor, target: float, name: str) -> torch.Tensor:
    """Mean binary cross-entropy of discriminator ``logits`` ``(B,)`` against the constant label ``target``."""
    if logits.dim() != 1:
        raise TokensieveError(f"{name} must be (B,), got shape {tuple(logits.shape)}")
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, target, dtype=torch.float))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy teaching the discriminator real=1 (unpruned), fake=0 (pruned) -> scalar.

    ``real_logits``, ``fake_logits`` ``(B,)``; the mean of the two terms. Detach the pruned hidden states
    before the discriminator when only the discriminator should learn from this.
    """
    return (_bce_towards(real_logits, 1.0, "real_logits") + _bce_towards(fake_logits, 0.0, "fake_logits")) / 2


def adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy pushing the discriminator's view of pruned states ``(B,)`` towards real (1) -> scalar."""
    return _bce_towards(fake_logits, 1.0, "fake_logits")
