"""Staged training of a testbed, as real LLaVA is built; one loop for both families (the LLaVA
testbed, :mod:`.llava_family`, and the Qwen2.5-VL one, :mod:`.qwen_family`, ``backbone="qwen"``).

Stage 1 (``tower``): the vision tower alone learns per-patch colour, shape and position
and (LLaVA), through its CLS token, which colour-shape pairs are present (so CLS attention lands on
objects because presence needs them, not because attention was supervised).
Stage 2 (``llm``): the tower is frozen; projector and LLM learn to answer questions, and
every object the question mentions is looked up at its mention word (auxiliary heads,
:mod:`tokensieve.testbed.mention_probe`); some batches see shortened image runs (objects and
part of the background) so that lookups survive token removal.
A resumable state (tensors and plain values, loaded with ``weights_only``) is written
atomically and fsynced every ``checkpoint_every`` steps, and at the step Ctrl-C ends.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokensieve.checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint, remove_stale_temporaries
from tokensieve.errors import TokensieveError
from tokensieve.interrupt import Interrupted, StopRequest, stop_at_step_end
from tokensieve.data.synthetic import FAMILIES, SPLIT_SEEDS
from tokensieve.testbed.llava_family import LlavaTestbed
from tokensieve.testbed.mention_probe import MentionProbe
from tokensieve.testbed.model import TestbedSize
from tokensieve.testbed.position_probe import VisualPositionProbe
from tokensieve.testbed.qwen_family import QwenTestbed

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
DONE_FILE = "testbed_training.json"
TESTBEDS = {"llava": LlavaTestbed(), "qwen": QwenTestbed()}


@dataclass
class TestbedTrainConfig:
    """Every knob of the two training stages."""

    tower_steps: int = 300
    tower_batch: int = 64
    tower_lr: float = 2e-3
    tower_weight_decay: float = 0.01  # AdamW's default, as the shipped testbed was trained
    llm_steps: int = 5000
    llm_batch: int = 32
    llm_lr: float = 2e-3
    # The tower's features have norm ~40, so an Adam step on the projector's first layer moves
    # its outputs ~40x more than on one-hot inputs; a lower rate keeps the readouts it starts from.
    projector_lr: float = 1e-4
    llm_min_lr: float = 2e-4
    llm_weight_decay: float = 0.0
    warmup_steps: int = 200
    # Spatial questions twice as often: their answer slot learns last (it reads the second
    # object's "holds" lookup, which only settles once both placements are looked up).
    family_weights: dict[str, float] = field(default_factory=lambda: {f: 2.0 if f == "spatial" else 1.0
                                                                       for f in FAMILIES})
    # (first step, min objects, max objects); with the mention lookups no curriculum is needed.
    object_curriculum: list[tuple[int, int, int]] = field(default_factory=lambda: [(0, 3, 5)])
    mention_layer: int = 4  # LLM hidden state (0 = embeddings) the mention lookups read
    relation_layer: int = 5  # the hidden state the spatial "holds" lookup reads
    mention_weight: float = 1.0
    # LLM hidden state at which every visual token names its own row and column (None: no such
    # loss). The Qwen testbed needs it: its tower leaves tokens no absolute place (docs/testbed.md).
    position_layer: int | None = None
    short_run_share: float = 0.25  # share of batches with shortened image runs
    checkpoint_every: int = 200
    eval_every: int = 1000
    eval_samples: int = 400
    threads: int = 2
    size: TestbedSize = field(default_factory=TestbedSize)
    backbone: str = "llava"  # the testbed's architecture: a key of TESTBEDS

    def __post_init__(self):
        if self.backbone not in TESTBEDS:
            raise TokensieveError(f"unknown testbed backbone {self.backbone!r}; expected one of {', '.join(TESTBEDS)}")
        if not 1 <= self.mention_layer <= self.relation_layer <= self.size.text_layers:
            raise TokensieveError(
                f"mention_layer {self.mention_layer} and relation_layer {self.relation_layer} must satisfy "
                f"1 <= mention_layer <= relation_layer <= {self.size.text_layers} (the LLM's layers)")
        if self.position_layer is not None and not 1 <= self.position_layer <= self.mention_layer:
            raise TokensieveError(f"position_layer {self.position_layer} must satisfy 1 <= position_layer <= "
                                  f"mention_layer ({self.mention_layer}): the lookups read the places it trains")


def lr_at(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """Linear warm-up then cosine decay from ``peak`` to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(dataset: torch.utils.data.Dataset, start: int, stop: int):
    """Batches ``start..stop-1`` prepared by one background worker while the main process trains."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), num_workers=1, prefetch_factor=4,
    )
    return iter(loader)


# Step counts may change on resume (to train longer); anything else would mix two models.
RESUMABLE_CHANGES = ("tower_steps", "llm_steps")


def _check_same_config(saved: dict, wanted: dict, state_path: Path) -> None:
    """Raise, naming the keys, unless a saved state was trained with the config asked for now."""
    differing = sorted(key for key in wanted.keys() | saved.keys()
                       if key not in RESUMABLE_CHANGES and saved.get(key) != wanted.get(key))
    if differing:
        raise TokensieveError(f"{state_path} was trained with another config ({', '.join(differing)} differ); "
                              "use another --out or pass --no-resume")


CANNOT_RESUME_HINT = "delete it or pass --no-resume"


def _cannot_resume(state_path: Path, err: Exception) -> TokensieveError:
    return TokensieveError(f"cannot resume from {state_path}: {type(err).__name__}; {CANNOT_RESUME_HINT}")


class _Run:
    """One training run folder: model, stage-1 probe, progress state, log and checkpoints."""

    def __init__(self, out: Path, cfg: TestbedTrainConfig, resume: bool, stop: StopRequest | None = None):
        self.out, self.cfg, self.resume = out, cfg, resume
        self.stop = stop or StopRequest()  # set by Ctrl-C: save at the next step's end, then stop
        remove_stale_temporaries(out)  # left by a killed run's writes
        torch.manual_seed(0)
        self.testbed = TESTBEDS[cfg.backbone]
        self.model, self.processor = self.testbed.build(cfg.size)
        self.probe = self.testbed.tower_probe(cfg.size)
        grid = self.testbed.scenes.grid
        self.mentions = MentionProbe(cfg.size.text_hidden, grid, cfg.mention_layer, cfg.relation_layer)
        self.positions = (None if cfg.position_layer is None
                          else VisualPositionProbe(cfg.size.text_hidden, grid, cfg.position_layer))
        self.state = {"stage": "tower", "step": 0, "elapsed_s": 0.0}
        self.saved_optimizer = None
        self.state_path = out / STATE_FILE
        resuming = resume and self.state_path.exists()
        if resuming:
            saved = load_checkpoint(self.state_path, CANNOT_RESUME_HINT)
            if not isinstance(saved, dict):
                raise _cannot_resume(self.state_path, TypeError())
            _check_same_config(saved.get("config", {}), asdict(cfg), self.state_path)
            try:
                self.model.load_state_dict(saved["model"])
                self.probe.load_state_dict(saved["probe"])
                self.mentions.load_state_dict(saved["mentions"])
                if self.positions is not None:
                    self.positions.load_state_dict(saved["positions"])
                self.state, self.saved_optimizer = saved["state"], saved["optimizer"]
            except Exception as err:  # any unreadable state means the same thing to the user
                raise _cannot_resume(self.state_path, err) from None
            print(f"resuming the {self.state['stage']} stage at step {self.state['step']}")
        self.log = (out / LOG_FILE).open("a" if resuming else "w")
        self.started = time.time() - self.state["elapsed_s"]

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        self.state["elapsed_s"] = time.time() - self.started
        atomic_torch_save({"model": self.model.state_dict(), "probe": self.probe.state_dict(),
                           "mentions": self.mentions.state_dict(),
                           "positions": None if self.positions is None else self.positions.state_dict(),
                           "state": self.state, "optimizer": optimizer.state_dict(),
                           "config": asdict(self.cfg)}, self.state_path)

    def record(self, **row) -> None:
        self.log.write(json.dumps({"stage": self.state["stage"], "step": self.state["step"],
                                   "elapsed_s": round(time.time() - self.started, 1), **row}) + "\n")
        self.log.flush()

    def optimizer(self, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if self.state["step"] > 0:  # mid-stage: continue exactly where the saved state stopped
            opt.load_state_dict(self.saved_optimizer)
        return opt

    def train_tower(self) -> None:
        """Stage 1: per-patch colour/shape/position (and LLaVA's CLS presence) on the tower alone."""
        cfg, tower = self.cfg, self.testbed.tower(self.model)
        tower.train()
        opt = self.optimizer(list(tower.parameters()) + list(self.probe.parameters()), cfg.tower_lr,
                             cfg.tower_weight_decay)
        data = self.testbed.tower_batches(self.processor, SPLIT_SEEDS["train"], cfg.tower_batch)
        bar = tqdm(_batches(data, self.state["step"], cfg.tower_steps), total=cfg.tower_steps,
                   initial=self.state["step"], desc="stage 1: vision tower", unit="step")
        for batch in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(self.state["step"], cfg.tower_steps, cfg.tower_lr, cfg.tower_lr / 10, 20)
            loss, stats = self.probe.loss(self.model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.state["step"] += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", patch_acc=f"{stats['patch_colour_acc']:.3f}")
            if self.state["step"] % 20 == 0:
                self.record(loss=loss.item(), **stats)
            if self.state["step"] % cfg.checkpoint_every == 0:
                self.save(opt)
            self.stop_if_asked(opt)
        self.state.update(stage="llm", step=0)
        self.save(opt)

    def train_llm(self) -> None:
        """Stage 2: tower frozen; projector + LLM learn to answer (loss on the answer token) and
        to look up every mentioned object at its mention (auxiliary loss)."""
        from tokensieve.data.synthetic_eval import heldout_samples
        from tokensieve.evaluate.predict import predict
        from tokensieve.testbed.evaluate import summarise

        cfg, model, testbed = self.cfg, self.model, self.testbed
        rest, projector = testbed.stage2_parameters(model)
        if self.state["step"] == 0:
            testbed.init_projector(model, self.probe)
        rest += list(self.mentions.parameters())
        if self.positions is not None:
            rest += list(self.positions.parameters())
        trainable = rest + projector
        opt = self.optimizer([{"params": rest, "peak": cfg.llm_lr}, {"params": projector, "peak": cfg.projector_lr}],
                             cfg.llm_lr, cfg.llm_weight_decay)
        heldout = heldout_samples(cfg.eval_samples, spec=testbed.scenes)
        data = testbed.question_batches(self.processor, SPLIT_SEEDS["train"], cfg)
        backbone = testbed.backbone(model, self.processor)
        bar = tqdm(_batches(data, self.state["step"], cfg.llm_steps), total=cfg.llm_steps,
                   initial=self.state["step"], desc="stage 2: projector + LLM", unit="step")
        running = None
        for batch in bar:
            for module in testbed.stage2_modules(model):
                module.train()
            for group in opt.param_groups:
                group["lr"] = lr_at(self.state["step"], cfg.llm_steps, group["peak"],
                                    group["peak"] * cfg.llm_min_lr / cfg.llm_lr, cfg.warmup_steps)
            answers, targets = batch.pop("answer_ids"), batch.pop("mention_targets")
            # Shortened runs move the image tokens; their places are trained on full runs only.
            places = (None if self.positions is None or batch["kept"] is not None
                      else testbed.visual_positions(self.processor, batch))
            out = backbone.forward(**batch, output_hidden_states=True)
            logits = out.logits[:, -1]  # (B, vocab) at the answer slot (prompts are left-padded)
            mention_loss, per_lookup = self.mentions.loss(out.hidden_states, targets)
            loss = F.cross_entropy(logits, answers) + cfg.mention_weight * mention_loss
            place_stats = {}
            if places is not None:
                place_loss, place_stats = self.positions.loss(out.hidden_states, places)
                loss = loss + place_loss
                place_stats["position_loss"] = place_loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            self.state["step"] += 1
            acc = float((logits.argmax(-1) == answers).float().mean())
            running = acc if running is None else 0.98 * running + 0.02 * acc
            bar.set_postfix(loss=f"{loss.item():.3f}", mentions=f"{mention_loss.item():.3f}", train_acc=f"{running:.3f}")
            if self.state["step"] % 50 == 0:
                self.record(loss=loss.item(), mention_loss=mention_loss.item(), train_acc=running,
                            lr=opt.param_groups[0]["lr"], lookups=per_lookup, **place_stats)
            if self.state["step"] % cfg.checkpoint_every == 0 or self.state["step"] == cfg.llm_steps:
                self.save(opt)
            if self.state["step"] % cfg.eval_every == 0 or self.state["step"] == cfg.llm_steps:
                model.eval()
                result = summarise(heldout, predict(backbone, heldout))
                self.record(heldout_accuracy=result["accuracy"], per_family=result["per_family"])
                tqdm.write(f"step {self.state['step']}: held-out accuracy {result['accuracy']:.3f} "
                           f"{result['per_family']}")
            self.stop_if_asked(opt)
        model.eval()

    def stop_if_asked(self, optimizer: torch.optim.Optimizer) -> None:
        """At a step's end, after Ctrl-C: save this step and raise :class:`Interrupted`."""
        if not self.stop.requested:
            return
        self.save(optimizer)
        resume = "rerun the same command to continue" if self.resume else "rerun it without --no-resume to continue"
        raise Interrupted(f"interrupted at {self.state['stage']} step {self.state['step']}, saved in "
                          f"{self.state_path}", resume)

    def finish(self) -> None:
        """Write the ordinary transformers checkpoint and processor; drop the resume state."""
        self.log.close()
        self.model.save_pretrained(self.out)
        self.processor.save_pretrained(self.out)
        atomic_write_text(self.out / DONE_FILE, json.dumps(
            {"config": asdict(self.cfg), "train_seconds": round(time.time() - self.started, 1)}, indent=2) + "\n")
        self.state_path.unlink()


def train_testbed(out: str | Path, cfg: TestbedTrainConfig = TestbedTrainConfig(), resume: bool = True) -> Path:
    """Train (or resume training) the testbed into ``out``; returns ``out``.

    A finished run is left alone when ``resume`` is set; its resume state is deleted at the end.
    """
    out = Path(out)
    if resume and (out / DONE_FILE).exists():
        print(f"{out} already holds a finished testbed; pass --no-resume to train again")
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    with stop_at_step_end() as stop:
        run = _Run(out, cfg, resume, stop)
        if run.state["stage"] == "tower":
            run.train_tower()
        run.train_llm()
    run.finish()
    return out
