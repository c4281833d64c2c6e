"""The Qwen testbed's part of the staged training: a Qwen2.5-VL (:mod:`.qwen_model`) trained as the
LLaVA testbed is (the members :mod:`tokensieve.testbed.llava_family` lists).

Stage 1 trains the window-attention tower on per-patch colour and shape labels, read after the
patch merger's RMSNorm (``merger.ln_q``): each of a token's 2x2 patches carries its token's
labels. No presence loss (there is no CLS token) and no row or column labels (the tower has no
absolute positions to read them from); docs/testbed.md says why.
Stage 2 runs the adapter's own forward (:class:`QwenVLBackbone`: M-RoPE ids from the full prompt,
shortened image runs kept at their positions), so training sees exactly what inference sees. The
places the tower cannot give are learnt in the LLM instead: the recipe trains with ``position_layer=2``
(:mod:`.position_probe`; :meth:`QwenTestbed.visual_positions` gives its targets).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.backbones.qwen_prompt import DEFAULT_SYSTEM, encode
from tokensieve.data.synthetic import COLOURS, SHAPES
from tokensieve.testbed.batches import QuestionBatches, TowerBatches
from tokensieve.testbed.llava_family import colour_accuracy, patch_losses, readout_rows
from tokensieve.testbed.model import TestbedSize
from tokensieve.testbed.position_probe import visual_position_targets
from tokensieve.testbed.qwen_model import (
    MERGE,
    QWEN_SCENES,
    build_qwen_processor,
    build_qwen_testbed_model,
)

SYSTEM = DEFAULT_SYSTEM["qwen2_5_vl"]  # the chat template's default system turn, as real prompts carry


def token_patches(visual: nn.Module, hidden: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The tower's per-patch output, normalised as the merger reads it, grouped per visual token:
    ``(sum_i N_i, 4, d)`` in the tokens' (row-major) order. hidden: ``(sum_i 4 N_i, d)`` in the
    tower's window order (``last_hidden_state``)."""
    vc = visual.config
    window_index, _ = get_vision_window_index(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    unit = vc.spatial_merge_size ** 2
    return visual.merger.ln_q(hidden).view(-1, unit, hidden.shape[-1])[torch.argsort(window_index)]


class QwenTowerProbe(nn.Module):
    """Stage-1 heads on every patch of the tower: the colour and shape of its token."""

    READOUTS = ("colour", "shape")

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = nn.Linear(hidden, len(COLOURS) + 1)
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        visual = model.model.visual
        out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        patches = token_patches(visual, out.last_hidden_state, batch["image_grid_thw"])
        losses = patch_losses(self, patches, batch)
        stats = {k: float(v.detach()) for k, v in losses.items()}
        stats["patch_colour_acc"] = colour_accuracy(self, patches, batch)
        return sum(losses.values()), stats


class QwenTestbed:
    """Qwen2.5-VL's layout: window-attention tower, 2x2 patch merger (the projector), Qwen2 with M-RoPE."""

    name = "qwen"
    scenes = QWEN_SCENES

    def build(self, size: TestbedSize):
        processor = build_qwen_processor()
        return build_qwen_testbed_model(processor.tokenizer, size), processor

    def tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def tower_probe(self, size: TestbedSize) -> nn.Module:
        return QwenTowerProbe(size.vision_hidden)

    def tower_batches(self, processor, seed: int, batch_size: int) -> TowerBatches:
        return TowerBatches(processor, seed, batch_size, self.scenes)

    def stage2_parameters(self, model: nn.Module) -> tuple[list, list]:
        """Freeze the tower but its merger; return the LLM's parameters and the merger's."""
        visual = model.model.visual
        visual.eval().requires_grad_(False)
        visual.merger.requires_grad_(True)
        rest = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
        return rest, list(visual.merger.parameters())

    def stage2_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.language_model, model.model.visual.merger]

    def init_projector(self, model: nn.Module, probe: QwenTowerProbe) -> None:
        """Start the merger's first layer as the stage-1 readouts of each token's first patch (its
        2x2 patches share their labels): colour and shape logits in its first units."""
        weight, bias = readout_rows(probe)
        first = model.model.visual.merger.mlp[0]  # (4 d, 4 d): the 2x2 patches side by side
        with torch.no_grad():
            first.weight[: len(weight)] = 0
            first.weight[: len(weight), : weight.shape[1]] = weight
            first.bias[: len(bias)] = bias

    def question_batches(self, processor, seed: int, cfg) -> QuestionBatches:
        return QuestionBatches(processor, seed, cfg.llm_batch, cfg.family_weights, cfg.object_curriculum,
                               spec=self.scenes, short_run_share=cfg.short_run_share,
                               encode=partial(encode, system=SYSTEM))

    def visual_positions(self, processor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(R, 4)`` targets of :class:`~tokensieve.testbed.position_probe.VisualPositionProbe`: each
        row's grid in tokens is its ``image_grid_thw`` (in patches) over the 2x2 merge."""
        grids = [(h // MERGE, w // MERGE) for _, h, w in batch["image_grid_thw"].tolist()]
        return visual_position_targets(batch["input_ids"], processor.image_token_id, grids)

    def backbone(self, model: nn.Module, processor) -> QwenVLBackbone:
        return QwenVLBackbone(model, processor)
