"""Hyper-parameter search over the two-stage pruner's config with Optuna (``tokensieve search``).

Each trial is one ``tokensieve train`` run in ``OUT/trials/<number>`` whose config is the
search file's training config plus the trial's values. The trainer reports every validation
to Optuna, whose pruner may stop the trial there. The study lives in an RDB storage (a local
SQLite file by default; any URL Optuna accepts), so workers on several machines can share
it: each runs trials until the study holds ``--trials`` finished ones. A worker that dies
stops sending heartbeats; another worker then marks its trial failed and runs it again with
the same values, resuming its run folder when it can see it. The best trial's config is
exported as ``OUT/best_config.yaml``, ready for ``tokensieve train``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from tokensieve.config import from_dict, save_config, to_dict
from tokensieve.errors import TokensieveError
from tokensieve.integrations.search_space import Param, Search, load_search
from tokensieve.interrupt import Interrupted
from tokensieve.optional import require
from tokensieve.train.two_stage_config import TwoStageConfig

BEST_CONFIG = "best_config.yaml"
BEST_TRIAL = "best_trial.json"


def _optuna():
    optuna = require("optuna", "search")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _shown(url: str) -> str:
    """``url`` with its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show it as given
        return url


def open_storage(url: str, heartbeat_s: int, retries: int):
    """An Optuna RDB storage with heartbeats; a URL that cannot be opened is a TokensieveError
    naming it (password hidden)."""
    optuna = _optuna()
    from sqlalchemy.exc import IntegrityError, OperationalError

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries))
        except Exception as err:  # sqlalchemy, drivers and optuna raise many types for a bad URL
            cause = err.__cause__ or err
            # Workers creating a new storage at once: a loser finds the tables or the version row just made.
            raced = isinstance(err, IntegrityError) or (
                isinstance(err, OperationalError) and "already exists" in str(err))
            if raced and attempt < 4:
                time.sleep(0.5 + random.random())
                continue
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise TokensieveError(
                f"cannot open the study storage {_shown(url)}: {type(cause).__name__}: {first}") from None


def _study(search: Search, storage):
    optuna = _optuna()
    s = search.cfg.study
    sampler = (optuna.samplers.TPESampler(seed=s.seed) if s.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=s.seed))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=s.warmup_steps)
              if s.pruner == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=search.name, direction="maximize", sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def suggest(trial, key: str, param: Param) -> Any:
    """The trial's value for one key of the space."""
    if param.choices is not None:
        if param.encoded:
            return json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in param.choices]))
        return trial.suggest_categorical(key, param.choices)
    if param.is_int:
        return trial.suggest_int(key, param.low, param.high, step=param.step or 1, log=param.log)
    return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)


def trained_flops_ratio(trainer) -> float:
    """Prefill FLOPs of the trainer's parts at their trained budget (hard mode) over the unpruned
    model's, for the median question length of the validation prompts."""
    from tokensieve.data.instruct import collate
    from tokensieve.evaluate.flops import full_prefill_flops, prefill_flops, token_counts
    from tokensieve.train.trainer import after_first_answer

    backbone = trainer.backbone
    batch = collate(backbone.processor, trainer.data.validation()[:32], label_eos=trainer.data.label_eos)
    question = (batch["attention_mask"].bool() & (batch["input_ids"] != backbone.image_token_id)
                & ~after_first_answer(batch["labels"]))
    text_tokens = int(question.sum(1).median())
    trainer.parts.eval()
    handle = trainer.parts.attach(backbone, "hard")
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            backbone.forward(*(batch[k][:1].to(trainer.cfg.run.device)
                               for k in ("input_ids", "attention_mask", "pixel_values")))
        pruned = token_counts(backbone, text_tokens, handle)
    finally:
        handle.detach()
        trainer.parts.train()
    return prefill_flops(backbone.config, *pruned)["total"] / full_prefill_flops(backbone, text_tokens)["total"]


def _objective(search: Search, out: Path):
    optuna = _optuna()
    from tokensieve.train.trainer import TwoStageTrainer

    weight = search.cfg.objective.flops_weight

    def objective(trial) -> float:
        values = {key: suggest(trial, key, param) for key, param in search.cfg.space.items()}
        try:
            cfg = search.trial_config(values)
        except TokensieveError as err:
            raise TokensieveError(f"trial {trial.number} {values}: {err}") from None
        frozen = trial.storage.get_trial(trial._trial_id)  # the retry marks live in the stored trial
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        run_dir = out / "trials" / f"{trial.number if retried is None else retried:04d}"
        trial.set_user_attr("config", to_dict(cfg))
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        flops = {"ratio": 0.0}

        def report(step: int, accuracy: float) -> None:
            value = accuracy - weight * flops["ratio"]
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation at step {step}: {value:.4f}")

        try:
            trainer = TwoStageTrainer(cfg, run_dir, resume=retried is not None, progress=False, on_validation=report)
            if weight:
                flops["ratio"] = trained_flops_ratio(trainer)
                trial.set_user_attr("flops_ratio", flops["ratio"])
            trainer.run()
        except TokensieveError as err:
            raise TokensieveError(f"trial {trial.number} {values}: {err}") from None
        except Interrupted:  # optuna records the trial as failed, and a rerun starts a new one
            raise Interrupted(f"search interrupted in trial {trial.number}",
                              "rerun the same command to continue (finished trials stay in the study)") from None
        trial.set_user_attr("val_accuracy", trainer.best)
        return trainer.best - weight * flops["ratio"]

    return objective


def export_best(study, out: Path) -> dict | None:
    """Write the best trial's training config to ``out/best_config.yaml`` (and a summary to
    ``best_trial.json``); None when no trial has completed. Trials added to the study by other
    means than ``tokensieve search`` (no ``config`` attribute) are not candidates."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and "config" in t.user_attrs]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    save_config(from_dict(TwoStageConfig, best.user_attrs["config"]), out / BEST_CONFIG)
    summary = {"study": study.study_name, "trial": best.number, "value": best.value, "params": best.params,
               **{k: best.user_attrs.get(k) for k in ("val_accuracy", "flops_ratio", "run_dir")}}
    (out / BEST_TRIAL).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_search(path: str | Path, trials: int, storage: str | None = None, out: str | Path | None = None) -> dict:
    """Run trials of the search in ``path`` until its study holds ``trials`` finished (complete or
    pruned) ones; returns the counts of trials by state and the best trial's summary (or None)."""
    optuna = _optuna()
    search = load_search(path)
    out = Path(out) if out is not None else Path("runs") / Path(path).stem
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = _study(search, open_storage(url, search.cfg.study.heartbeat_s, search.cfg.study.retries))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if len(study.get_trials(deepcopy=False, states=finished)) < trials:
        study.optimize(_objective(search, out), callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished)],
                       gc_after_trial=True)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return {"study": search.name, "storage": url, "out": str(out), "trials": counts, "best": export_best(study, out)}


def search_command(args) -> None:
    """``tokensieve search CONFIG --trials N [--storage URL] [--out DIR]``."""
    result = run_search(args.config, args.trials, args.storage, args.out)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(result["trials"].items()))
    print(f"study {result['study']} ({result['storage']}): {counts}")
    best = result["best"]
    if best is None:
        print("no trial has completed yet")
        return
    print(f"best trial #{best['trial']}: value {best['value']:.4f} with {best['params']}")
    print(f"its config: {Path(result['out']) / BEST_CONFIG} (train it with: tokensieve train "
          f"{Path(result['out']) / BEST_CONFIG} --out DIR)")
