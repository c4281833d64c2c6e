"""The LLaVA testbed's part of the staged training (:mod:`tokensieve.testbed.train`): its model and
processor, the stage-1 heads on the CLIP tower, and the stage-2 split into tower, projector and LLM.

Every family (this one, :mod:`tokensieve.testbed.qwen_family`) offers the same members, which the
one training loop calls: ``scenes``, ``build``, ``tower``, ``tower_probe``, ``tower_batches``,
``stage2_parameters``, ``stage2_modules``, ``init_projector``, ``question_batches``, ``backbone``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokensieve.backbones import LlavaBackbone
from tokensieve.data.synthetic import COLOURS, SHAPES, SceneSpec
from tokensieve.testbed.batches import QuestionBatches, TowerBatches
from tokensieve.testbed.model import TestbedSize, build_testbed_model
from tokensieve.testbed.position_probe import visual_position_targets
from tokensieve.testbed.processor import build_processor


def patch_losses(heads: nn.Module, patches: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy of the per-patch heads named in ``heads.READOUTS`` (colour, shape, row, column).

    patches: ``(P, k, d)`` features, each of the ``k`` of a row labelled with the batch's
    ``(P,)`` ids (k = 1 for a CLIP patch; 4 for the 2x2 patches of a Qwen visual token).
    """
    k = patches.shape[1]
    return {name: F.cross_entropy(getattr(heads, name)(patches).flatten(0, 1),
                                  batch[f"{name}_ids"].repeat_interleave(k))
            for name in heads.READOUTS}


def colour_accuracy(heads: nn.Module, patches: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Share of patches (``(P, k, d)``) whose colour head is right."""
    return float((heads.colour(patches).argmax(-1) == batch["colour_ids"][:, None]).float().mean())


class TowerProbe(nn.Module):
    """Stage-1 heads on the tower: per-patch colour/shape/row/column, CLS presence."""

    READOUTS = ("colour", "shape", "row", "col")

    def __init__(self, hidden: int, grid: int):
        super().__init__()
        self.colour = nn.Linear(hidden, len(COLOURS) + 1)
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.row = nn.Linear(hidden, grid)
        self.col = nn.Linear(hidden, grid)
        self.presence = nn.Linear(hidden, len(COLOURS) * len(SHAPES))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        tower = model.model.vision_tower
        out = tower(batch["pixel_values"])
        patches = out.last_hidden_state[:, 1:].flatten(0, 1)[:, None]  # (B*N, 1, d): the tokens LLaVA feeds the LLM
        cls = tower.post_layernorm(out.last_hidden_state[:, 0])  # (B, d)
        losses = patch_losses(self, patches, batch)
        losses["presence"] = F.binary_cross_entropy_with_logits(self.presence(cls), batch["presence"])
        stats = {k: float(v.detach()) for k, v in losses.items()}
        stats["patch_colour_acc"] = colour_accuracy(self, patches, batch)
        return sum(losses.values()), stats


def readout_rows(probe: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage-1 per-patch readouts (the heads ``probe.READOUTS`` names) stacked: ``(R, d)``, ``(R,)``."""
    heads = [getattr(probe, name) for name in probe.READOUTS]
    return torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads])


class LlavaTestbed:
    """LLaVA-1.5's layout: CLIP tower (CLS + 100 patches), MLP projector, Llama."""

    name = "llava"
    scenes = SceneSpec()

    def build(self, size: TestbedSize):
        processor = build_processor()
        tok = processor.tokenizer
        model = build_testbed_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
                                    tok.convert_tokens_to_ids("<image>"), size=size)
        return model, processor

    def tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def tower_probe(self, size: TestbedSize) -> nn.Module:
        return TowerProbe(size.vision_hidden, self.scenes.grid)

    def tower_batches(self, processor, seed: int, batch_size: int) -> TowerBatches:
        return TowerBatches(processor, seed, batch_size)

    def stage2_parameters(self, model: nn.Module) -> tuple[list, list]:
        """Freeze the tower; return the LLM's parameters and the projector's."""
        model.model.vision_tower.eval().requires_grad_(False)
        rest = [p for n, p in model.named_parameters()
                if not n.startswith(("model.vision_tower", "model.multi_modal_projector"))]
        return rest, list(model.model.multi_modal_projector.parameters())

    def stage2_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.language_model, model.model.multi_modal_projector]

    def init_projector(self, model: nn.Module, probe: TowerProbe) -> None:
        """Start the projector's first layer as the stage-1 per-patch readouts (colour, shape, row,
        column logits in its first units): the LLM then starts from features it can look up in,
        as LLaVA's projector-alignment stage gives it."""
        weight, bias = readout_rows(probe)
        first = model.model.multi_modal_projector.linear_1
        with torch.no_grad():
            first.weight[: len(weight)] = weight
            first.bias[: len(bias)] = bias

    def question_batches(self, processor, seed: int, cfg) -> QuestionBatches:
        return QuestionBatches(processor, seed, cfg.llm_batch, cfg.family_weights, cfg.object_curriculum,
                               short_run_share=cfg.short_run_share)

    def visual_positions(self, processor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(R, 4)`` targets of :class:`~tokensieve.testbed.position_probe.VisualPositionProbe`: every
        image is one square grid."""
        grid = (self.scenes.grid, self.scenes.grid)
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        return visual_position_targets(batch["input_ids"], image_token_id, [grid] * len(batch["input_ids"]))

    def backbone(self, model: nn.Module, processor) -> LlavaBackbone:
        return LlavaBackbone(model, processor)
