"""Train the two-stage pruner on a frozen backbone (``tokensieve train CONFIG.yaml``).

Each step runs the batch twice: the unpruned backbone (teacher, no gradients) and the pruned
one in ``soft`` mode, where the merger's centres replace the visual tokens and every head's
hard Gumbel-softmax mask weights the tokens as attention keys. Losses: answer cross-entropy,
KL distillation from the teacher, target-ratio sparsity of the heads' keep probabilities
(visual tokens only), merge sparsity, optional hidden-state MSE and adversarial loss.

The run folder (:mod:`tokensieve.train.run_folder`) also holds TensorBoard events in ``tb/``.
Every file is written atomically and fsynced, so ``kill -9`` at any moment and ``--resume``
give the weights of an uninterrupted run; Ctrl-C saves the step it ends and stops
(:mod:`tokensieve.interrupt`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tokensieve import optional
from tokensieve.attach import Handle
from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.backbones.load import load_backbone
from tokensieve.checkpoint import remove_stale_temporaries
from tokensieve.config import save_config
from tokensieve.distributed import Distributed
from tokensieve.errors import TokensieveError
from tokensieve.interrupt import Interrupted, stop_at_step_end
from tokensieve.learned import keep_probability
from tokensieve.pruner.training_step import TrainingStep
from tokensieve.pruner.two_stage import CONFIG_FILE, TwoStagePruner
from tokensieve.train import losses, schedules
from tokensieve.train.run_folder import (
    LOG_FILE,
    STATE_FILE,
    check_run_folder,
    drop_log_rows_after,
    load_run_state,
    mark_done,
    save_run_state,
)
from tokensieve.train.training_data import TrainingData, collate_for, model_inputs
from tokensieve.train.two_stage_config import TwoStageConfig


@dataclass
class StepLosses:
    total: torch.Tensor
    parts: dict[str, float]
    keep_ratios: list[float]


class TwoStageTrainer:
    """on_validation: called as ``on_validation(step, val_accuracy)`` after each validation step
    is logged (and checkpointed, if due); it may raise to stop the run, e.g. ``optuna.TrialPruned``.
    backbone: one already in memory, used instead of loading ``cfg.model`` (``tokensieve bench
    train`` times steps on a random model of a real shape)."""

    def __init__(self, cfg: TwoStageConfig, out: str | Path, resume: bool = False, progress: bool = True,
                 on_validation: Callable[[int, float], None] | None = None, backbone: LlavaBackbone | QwenVLBackbone | None = None):
        self.cfg, self.out, self.progress, self.on_validation = cfg, Path(out), progress, on_validation
        self.resume = resume
        torch.set_num_threads(cfg.run.threads)
        self.dist = Distributed(cfg.run.device)  # one process unless launched by accelerate or torchrun
        self.dist.check_batch(cfg.optim.batch_size)
        check_run_folder(self.out, cfg, resume)
        if backbone is None:
            dtype = None if cfg.run.dtype == "auto" else getattr(torch, cfg.run.dtype)
            backbone = load_backbone(cfg.model, dtype, cfg.run.device)
        self.backbone = backbone
        if self.backbone.processor is None:
            raise TokensieveError(f"{cfg.model} has no processor; training needs one")
        self.collate = collate_for(backbone)
        self.backbone.model.requires_grad_(False).eval()
        from tokensieve.data.synthetic_eval import scene_spec_for

        self.data = TrainingData(cfg, scene_spec_for(self.backbone))
        torch.manual_seed(cfg.run.seed)
        self.parts = TwoStagePruner(cfg, self.backbone).to(cfg.run.device)
        o = cfg.optim
        parts = {"token_merger": self.parts.token_merger, "layer_pruners": self.parts.layer_pruners,
                 "discriminator": self.parts.discriminator}
        groups = [{"name": name, "params": list(part.parameters()), "lr": self.base_lr(name)}
                  for name, part in parts.items() if part is not None]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=o.weight_decay)
        self.step, self.best = 0, None
        self.last_validation: dict[int | None, float] = {}
        if self.dist.is_main:
            for folder in (self.out, self.out / "best"):
                remove_stale_temporaries(folder)  # left by a killed run's writes
        self.dist.barrier()  # every process has checked the folder before the main one writes to it
        if resume and (self.out / STATE_FILE).exists():
            self._load_state()
        elif self.dist.is_main:
            save_config(cfg, self.out / CONFIG_FILE)

    def base_lr(self, group: str) -> float:
        """The configured learning rate of an optimizer group (``optim.lr_<group>``)."""
        return getattr(self.cfg.optim, f"lr_{group}")

    # --- run folder (tokensieve.train.run_folder) -------------------------------------------
    def _save_state(self) -> None:
        if self.dist.is_main:
            save_run_state(self.out, self.parts, self.optimizer, self.step, self.best)

    def _load_state(self) -> None:
        self.step, self.best = load_run_state(self.out, self.parts, self.optimizer)
        if self.dist.is_main:
            drop_log_rows_after(self.out / LOG_FILE, self.step)  # those steps run again

    # --- one step -----------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.cfg.run.device) for k, v in batch.items()}

    def _losses(self, batch: dict, text: torch.Tensor, student, teacher, step: TrainingStep) -> StepLosses:
        """text: ``(B, L)`` the real non-image positions (hidden-state and discriminator losses);
        step: what the pruner set for this step, filled by the student forward."""
        cfg, total = self.cfg, self.cfg.optim.steps
        w, labels = cfg.loss, batch["labels"]
        parts = {"task": losses.answer_cross_entropy(student.logits, labels)}
        if w.distill:
            parts["distill"] = losses.distillation_kl(student.logits, teacher.logits, labels, w.distill_temperature)
        keep_ratios = []
        if step.head_targets:
            cumulative, sparsity = None, []
            for (logits, valid), target in zip(step.keep_logits(len(labels)), step.head_targets):
                p = keep_probability(logits)  # (B, n) of the tokens entering the LLM (valid: real ones)
                cumulative = p if cumulative is None else cumulative * p
                now = schedules.target_ratio_at(step.step, total, target, cfg.schedule.target_curriculum)
                sparsity.append(losses.target_ratio_sparsity(cumulative, valid, now))
                keep_ratios.append(float(cumulative.detach()[valid].mean()))
            parts["sparsity"] = torch.stack(sparsity).mean()
        if step.centres is not None and w.merge_sparsity:
            terms = []  # one per merger call (the batch, or each image where images differ in count)
            for merged in step.merged():
                n, centres = merged.logits.shape[1], merged.indices.shape[1]  # this step's centres
                p = torch.sigmoid(merged.logits)
                terms.append(losses.target_ratio_sparsity(p, torch.ones_like(p, dtype=torch.bool), centres / n))
            parts["merge_sparsity"] = torch.stack(terms).mean()
        if w.hidden_mse:
            parts["hidden_mse"] = losses.hidden_state_mse(student.hidden_states[-1], teacher.hidden_states[-1], text)
        weights = {"task": w.task, "distill": w.distill, "merge_sparsity": w.merge_sparsity, "hidden_mse": w.hidden_mse,
                   "sparsity": schedules.warmup_weight_at(step.step, total, w.sparsity, cfg.schedule.sparsity_warmup)}
        loss = sum(weights[k] * v for k, v in parts.items())
        if self.parts.discriminator is not None:
            fake = self._disc_states(student)
            if w.adversarial:
                parts["adversarial"] = losses.adversarial_loss(self.parts.discriminator(fake, text))
                loss = loss + w.adversarial * parts["adversarial"]
        return StepLosses(loss, {k: float(v.detach()) for k, v in parts.items()}, keep_ratios)

    def _disc_states(self, output) -> list[torch.Tensor]:
        return [output.hidden_states[k] for k in self.cfg.discriminator.layers]

    def _discriminator_step(self, student, teacher, text) -> dict[str, float]:
        disc = self.parts.discriminator
        real = disc([h.detach() for h in self._disc_states(teacher)], text)
        fake = disc([h.detach() for h in self._disc_states(student)], text)
        loss = losses.discriminator_loss(real, fake)
        loss.backward()  # only the discriminator's inputs are detached: its own parameters get these
        return {"discriminator": float(loss.detach()), "disc_prob_real": float(torch.sigmoid(real.detach()).mean()),
                "disc_prob_fake": float(torch.sigmoid(fake.detach()).mean())}

    def train_step(self, handle: Handle) -> dict:
        """One optimizer step; ``handle``: the pruner's latest ``attach(..., training=True)``."""
        cfg = self.cfg
        tau = schedules.temperature_at(self.step, cfg.optim.steps, cfg.schedule.tau_start, cfg.schedule.tau_end,
                                       cfg.schedule.tau_kind, cfg.schedule.anneal_fraction, cfg.schedule.tau_floor)
        step = self.parts.set_step(self.step, tau)
        batch = self._to_device(self.collate(self.backbone.processor, self.dist.shard(self.data.batch(self.step)),
                                             label_eos=self.data.label_eos))
        need_hidden = cfg.loss.hidden_mse > 0 or self.parts.discriminator is not None
        inputs = model_inputs(batch)
        with torch.no_grad(), handle.disabled():
            teacher = self.backbone.forward(**inputs, output_hidden_states=need_hidden)
        student = self.backbone.forward(**inputs, answer_mask=after_first_answer(batch["labels"]),
                                        output_hidden_states=need_hidden)
        text = batch["attention_mask"].bool() & (batch["input_ids"] != self.backbone.image_token_id)
        step_losses = self._losses(batch, text, student, teacher, step)
        self.optimizer.zero_grad(set_to_none=True)
        step_losses.total.backward()
        row = {"loss": float(step_losses.total.detach()), **step_losses.parts, "tau": tau,
               "keep_ratio": step_losses.keep_ratios}
        if self.parts.discriminator is not None:
            disc = self.parts.discriminator
            for p in disc.parameters():
                p.grad = None  # the adversarial term trains the pruners, not the discriminator
            row.update(self._discriminator_step(student, teacher, text))
        self.dist.sync_gradients(self.parts.parameters())
        torch.nn.utils.clip_grad_norm_(self.parts.parameters(), cfg.optim.grad_clip)
        factor = schedules.lr_factor_at(self.step, cfg.optim.steps, cfg.optim.lr_schedule, cfg.optim.lr_floor)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr(group["name"]) * factor
        self.optimizer.step()
        if self.parts.discriminator is not None and random.random() < cfg.discriminator.reinit_prob:
            self.parts.discriminator.reinitialise()
            for p in self.parts.discriminator.parameters():
                self.optimizer.state.pop(p, None)  # a fresh discriminator starts with fresh moments
            row["disc_reinitialised"] = 1
        self.step += 1
        return self.dist.average(row)

    # --- validation ---------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Teacher-forced accuracy over the answer tokens (for one-word answers: the answer
        accuracy), merger and heads deterministic, in ``soft`` mode with binary masks (equal to
        ``hard`` removal on the kept tokens); the mean over the merger budgets of
        :meth:`TwoStagePruner.validation_centres` (each one's score: ``last_validation``)."""
        self.last_validation = {centres: self._validate_at(centres) for centres in self.parts.validation_centres()}
        return sum(self.last_validation.values()) / len(self.last_validation)

    def _validate_at(self, centres: int | None) -> float:
        self.parts.eval()
        handle = self.parts.attach(self.backbone, "soft", training=False, centres=centres)
        try:
            examples, right, total = self.dist.shard(self.data.validation()), 0, 0
            for i in range(0, len(examples), 32):
                batch = self._to_device(self.collate(self.backbone.processor, examples[i: i + 32],
                                                     label_eos=self.data.label_eos))
                logits = self.backbone.forward(**model_inputs(batch),
                                               answer_mask=after_first_answer(batch["labels"])).logits
                labels = batch["labels"][:, 1:]
                scored = labels != -100
                right += int((logits[:, :-1].argmax(-1) == labels)[scored].sum())
                total += int(scored.sum())
            right, total = self.dist.sum([right, total])
        finally:
            handle.detach()
            self.parts.train()
        return right / total

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> Path:
        SummaryWriter = optional.summary_writer()  # events in tb/ only with tokensieve[tensorboard] installed

        cfg = self.cfg
        self.parts.train()
        handle = self.parts.attach(self.backbone, "soft", training=True)
        main = self.dist.is_main  # the only process that writes the run folder
        log = (self.out / LOG_FILE).open("a") if main else None
        writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step) if main else None
        started = time.time()
        bar = tqdm(total=cfg.optim.steps, initial=self.step, desc="training the two-stage pruner", unit="step",
                   disable=not (self.progress and main))
        try:
            with stop_at_step_end() as stop:
                while self.step < cfg.optim.steps:
                    row = self.train_step(handle)
                    if self.step % cfg.validation.every == 0 or self.step == cfg.optim.steps:
                        handle.detach()
                        row["val_accuracy"] = self.validate()
                        if len(self.last_validation) > 1:
                            row.update({f"val_accuracy_at_{c}": v for c, v in self.last_validation.items()})
                        if self.best is None or row["val_accuracy"] > self.best:
                            self.best = row["val_accuracy"]
                            if main:
                                self.parts.save_pretrained(self.out / "best",
                                                {"step": str(self.step), "val_accuracy": str(self.best)})
                        handle = self.parts.attach(self.backbone, "soft", training=True)
                    row = {"step": self.step, "elapsed_s": round(time.time() - started, 1), **row}
                    if main:
                        self._record(row, log, writer)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tau=f"{row['tau']:.2f}",
                                    keep="/".join(f"{r:.2f}" for r in row["keep_ratio"]))
                    if self.step % cfg.run.checkpoint_every == 0 or self.step == cfg.optim.steps:
                        self._save_state()
                    if "val_accuracy" in row and self.on_validation is not None:
                        self.on_validation(self.step, row["val_accuracy"])
                    # Every process stops at the same step, or the others would wait for it forever.
                    if self.step < cfg.optim.steps and self.dist.sum([int(stop.requested)])[0]:
                        self._stop_here()
        finally:
            handle.detach()
            bar.close()
            if main:
                writer.close()
                log.close()
        if main:
            mark_done(self.out, self.step, self.best)
        return self.out

    def _stop_here(self) -> None:
        """Ctrl-C at a step boundary: save this step (unless just saved) and raise :class:`Interrupted`."""
        if self.step % self.cfg.run.checkpoint_every:
            self._save_state()
        resume = "rerun the same command to continue" if self.resume else "rerun it with --resume to continue"
        raise Interrupted(f"interrupted at step {self.step} of {self.cfg.optim.steps}, saved in {self.out}", resume)

    def _record(self, row: dict, log, writer) -> None:
        """One row of ``log.jsonl`` and its TensorBoard scalars."""
        log.write(json.dumps(row) + "\n")
        log.flush()
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                writer.add_scalar(key, value, self.step)
        for i, ratio in enumerate(row["keep_ratio"]):
            writer.add_scalar(f"keep_ratio/stage{i}", ratio, self.step)


def after_first_answer(labels: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` True from each row's first answer token on. In a teacher-forced sequence
    every later token has seen an answer, so methods reading the question stop before it."""
    return (labels != -100).cumsum(1) > 0


def train_two_stage(cfg: TwoStageConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) a two-stage pruner into ``out``; returns ``out``."""
    return TwoStageTrainer(cfg, out, resume, progress).run()
