"""Training-step speed and memory of the two-stage pruner on a LLaVA-shaped random model.

No real checkpoint can be fetched here, yet a GPU user needs to know what a config costs before
renting the hours: the backbone is randomly initialised at a real shape (a random model times
like a trained one), with the testbed's tokenizer and a processor at the shape's image and
patch size (built by the caller: the testbed is a layer above), and the steps train on synthetic
scenes drawn at that size. Each step is the real one (:meth:`TwoStageTrainer.train_step`:
student and teacher passes, every loss, the optimizer), with the config's schedules at their
first steps.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace

import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from tokensieve.backbones import LlavaBackbone
from tokensieve.evaluate.speed import BenchShape, bench_config, build_random
from tokensieve.evaluate.timing import synchronizer
from tokensieve.train.trainer import TwoStageTrainer
from tokensieve.train.two_stage_config import TwoStageConfig


def random_llava_backbone(shape: BenchShape, processor: LlavaProcessor, dtype: torch.dtype = torch.float32,
                          device: str = "cpu") -> LlavaBackbone:
    """A random LLaVA of ``shape`` whose vocabulary and processor are ``processor``'s: the
    testbed's (so synthetic scenes and questions can be encoded), images at the shape's size."""
    tok = processor.tokenizer
    config = bench_config(replace(shape, vocab=len(tok)))
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    text = config.text_config
    text.pad_token_id, text.bos_token_id, text.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return LlavaBackbone(build_random(LlavaForConditionalGeneration, config, dtype, device), processor)


def train_step_benchmark(cfg: TwoStageConfig, shape: BenchShape, processor: LlavaProcessor, steps: int = 10,
                         warmup: int = 2, dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Median seconds of ``steps`` training steps (after ``warmup`` untimed ones) of ``cfg`` on a
    random model of ``shape`` on ``cfg.run.device``, the peak device memory (CUDA only) and
    ``projected_hours``: the median step times ``cfg.optim.steps`` (validation not included).

    processor: the testbed's processor at the shape's image and patch size."""
    device = cfg.run.device
    backbone = random_llava_backbone(shape, processor, dtype, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    sync = synchronizer(device)
    with tempfile.TemporaryDirectory() as out:
        trainer = TwoStageTrainer(cfg, out, progress=False, backbone=backbone)
        trainer.parts.train()
        handle = trainer.parts.attach(backbone, "soft", training=True)
        seconds, row = [], {}
        try:
            for i in tqdm(range(warmup + steps), desc="training steps", unit="step", disable=not progress):
                sync()
                started = time.perf_counter()
                row = trainer.train_step(handle)
                sync()
                if i >= warmup:
                    seconds.append(time.perf_counter() - started)
        finally:
            handle.detach()
        trainable = sum(p.numel() for p in trainer.parts.parameters())
    step_s = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return {"steps_timed": steps, "batch_size": cfg.optim.batch_size, "step_s_median": round(step_s, 3),
            "step_s_min": round(min(seconds), 3), "samples_per_s": round(cfg.optim.batch_size / step_s, 2),
            "peak_memory_gib": None if peak is None else round(peak, 2), "trainable_parameters": trainable,
            "backbone_parameters": sum(p.numel() for p in backbone.model.parameters()),
            "config_steps": cfg.optim.steps, "projected_hours": round(step_s * cfg.optim.steps / 3600, 2),
            "last_step": {k: row[k] for k in ("loss", "tau", "keep_ratio") if k in row}}
