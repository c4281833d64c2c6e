"""Trainable parts of the learned two-stage pruner, as plain torch modules on tensors (no model knowledge)."""

from tokensieve.learned.discriminator import HiddenStateDiscriminator
from tokensieve.learned.pruner_head import LayerPrunerHead, inference_keep, keep_probability, training_keep_mask
from tokensieve.learned.token_merger import MergeResult, QuestionCrossAttention, TokenMerger

__all__ = [
    "HiddenStateDiscriminator",
    "LayerPrunerHead",
    "MergeResult",
    "QuestionCrossAttention",
    "TokenMerger",
    "inference_keep",
    "keep_probability",
    "training_keep_mask",
]
