"""Train the tiny CLIP contrastively on captioned shape images (resumable, atomic writes).

``train_tiny_clip(out)`` runs ``steps`` AdamW steps of the symmetric CLIP loss on fresh
batches (image ``i`` of step ``s`` is training image ``s * batch + i``, so a resumed run sees
the same data), saves ``out/state.pt`` atomically (fsynced; tensors and plain values, loaded
with ``weights_only``) every ``save_every`` steps and at the step Ctrl-C ends, resumes from
it, and finally writes the checkpoint (:func:`tokensieve.clip.tiny.save_tiny`) and
``train_log.json`` with the zero-shot accuracy on held-out classification images.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokensieve.checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint, remove_stale_temporaries
from tokensieve.clip.shapes import CLASSNAMES, SEEDS, TEMPLATES, shape_image, training_pair
from tokensieve.clip.tiny import TINY_NAME, build_tiny, register_config, save_tiny
from tokensieve.errors import TokensieveError
from tokensieve.interrupt import Interrupted, stop_at_step_end


@dataclass
class TinyTrainConfig:
    steps: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.05
    save_every: int = 50
    eval_images: int = 360
    seed: int = 0


def pixels(images: np.ndarray, model) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` normalised like the model's eval transform."""
    cfg = model.visual.preprocess_cfg
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]


def _lr(cfg: TinyTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n_images: int) -> float:
    """Top-1 zero-shot accuracy on the first ``n_images`` held-out one-object images."""
    model.eval()
    texts = tokenizer([t.format(c=c) for c in CLASSNAMES for t in TEMPLATES])
    classes = F.normalize(model.encode_text(texts), dim=-1).view(len(CLASSNAMES), len(TEMPLATES), -1).mean(1)
    items = [shape_image(SEEDS["classification"], i) for i in range(n_images)]
    features = F.normalize(model.encode_image(pixels(np.stack([it.image for it in items]), model)), dim=-1)
    predicted = (features @ F.normalize(classes, dim=-1).T).argmax(1)
    return float((predicted == torch.tensor([it.label for it in items])).float().mean())


def train_tiny_clip(out: Path, cfg: TinyTrainConfig | None = None, resume: bool = True,
                    progress: bool = True) -> Path:
    """Train (or resume) and write the checkpoint into ``out``; returns the weights file."""
    out, cfg = Path(out), cfg or TinyTrainConfig()
    model, _ = build_tiny(cfg.seed)
    tokenizer = register_config().get_tokenizer(TINY_NAME)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, log = 0, []
    state_path = out / "state.pt"
    remove_stale_temporaries(out)  # left by a killed run's writes
    if resume and state_path.is_file():
        state = load_checkpoint(state_path, "delete it or pass --no-resume")
        saved = state.get("config") if isinstance(state, dict) else None
        if saved is None:
            raise TokensieveError(f"{state_path} is not a tiny CLIP training state; use another --out or --no-resume")
        if saved != asdict(cfg):
            raise TokensieveError(f"{state_path} was saved with a different configuration {saved}; "
                                  "use another --out or --no-resume")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, log = state["step"], state["log"]
        except (KeyError, RuntimeError, ValueError) as err:
            raise TokensieveError(f"cannot resume from {state_path}: {type(err).__name__}; "
                                  "delete it or pass --no-resume") from None
    started = time.perf_counter()
    model.train()
    with stop_at_step_end() as stop:
        while step < cfg.steps:
            rng = np.random.default_rng([cfg.seed, step])
            pairs = [training_pair(step * cfg.batch_size + i, rng) for i in range(cfg.batch_size)]
            images = pixels(np.stack([p[0].image for p in pairs]), model)
            texts = tokenizer([p[1] for p in pairs])
            for group in optimizer.param_groups:
                group["lr"] = _lr(cfg, step)
            image_features, text_features, scale = model(images, texts)
            logits = scale * image_features @ text_features.T
            # objects repeat within a batch (18 classes): every pair showing the same objects is a positive
            same = torch.tensor([[a[0].names == b[0].names for b in pairs] for a in pairs])
            target = same.float() / same.float().sum(1, keepdim=True)
            loss = (torch.sum(-target * logits.log_softmax(1), 1).mean()
                    + torch.sum(-target * logits.T.log_softmax(1), 1).mean()) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            if step % 10 == 0 or step == cfg.steps:
                log.append({"step": step, "loss": round(loss.item(), 4), "lr": _lr(cfg, step - 1),
                            "seconds": round(time.perf_counter() - started, 1)})
                if progress:
                    print(json.dumps(log[-1]), flush=True)
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested:
                atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                   "log": log, "config": asdict(cfg)}, state_path)
            if stop.requested:
                again = "rerun the same command" if resume else "rerun it without --no-resume"
                raise Interrupted(f"interrupted at step {step} of {cfg.steps}, saved in {state_path}",
                                  f"{again} to continue")
    weights = save_tiny(model, out)
    from tokensieve.clip.tiny import load_tiny

    shipped, _, _ = load_tiny(weights)  # what users get: float16 weights, sparse embedding
    summary = {"config": asdict(cfg), "model": TINY_NAME, "zero_shot_accuracy": zero_shot_accuracy(
        shipped, tokenizer, cfg.eval_images), "chance": 1 / len(CLASSNAMES), "log": log}
    atomic_write_text(out / "train_log.json", json.dumps(summary, indent=2) + "\n")
    if progress:
        print(f"zero-shot accuracy on {cfg.eval_images} held-out images: {summary['zero_shot_accuracy']:.3f}")
    return weights
