"""What the two-stage trainer feeds the backbone: the examples of each step and of validation, and
how a batch of them is built for the backbone's family."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.data.instruct import (
    InstructExample,
    collate,
    load_instruct,
    synthetic_examples,
)
from tokensieve.data.qwen_instruct import collate_qwen
from tokensieve.data.synthetic import SPLIT_SEEDS, training_seed
from tokensieve.errors import TokensieveError
from tokensieve.train.two_stage_config import TwoStageConfig


class TrainingData:
    """Batch ``i`` depends only on ``i`` (so a resumed run sees exactly the same batches)."""

    def __init__(self, cfg: TwoStageConfig, spec):
        self.cfg, self.spec = cfg, spec
        # The testbed answers one word and was never trained on what follows it.
        self.label_eos = cfg.data.kind == "instruct"
        self.records: list[InstructExample] | None = None
        if cfg.data.kind == "instruct":
            self.records = load_instruct(Path(cfg.data.path), Path(cfg.data.image_folder))
            if len(self.records) <= cfg.validation.samples:
                raise TokensieveError(f"{cfg.data.path} has {len(self.records)} records; validation alone takes "
                                      f"{cfg.validation.samples}")

    def batch(self, step: int) -> list[InstructExample]:
        b = self.cfg.optim.batch_size
        if self.records is None:
            return synthetic_examples(training_seed(self.cfg.data.seed), step * b, b, self.spec)
        pool = self.records[self.cfg.validation.samples:]
        return [pool[(step * b + k) % len(pool)] for k in range(b)]

    def validation(self) -> list[InstructExample]:
        if self.records is None:
            return synthetic_examples(SPLIT_SEEDS["validation"], 0, self.cfg.validation.samples, self.spec)
        return self.records[: self.cfg.validation.samples]


def collate_for(backbone) -> Callable[..., dict]:
    """The batch builder of ``backbone``'s family, called as ``(processor, examples, label_eos=...)``:
    LLaVA-1.5's conversation format, or a Qwen-VL model's chat format with each image's grid."""
    if isinstance(backbone, QwenVLBackbone):
        return partial(collate_qwen, system=backbone.system_prompt)
    return collate


def model_inputs(batch: dict) -> dict:
    """What the backbone's forward takes of a batch (Qwen-VL: also each image's grid)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in batch}
