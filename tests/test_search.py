"""tokensieve search: Optuna trials of tiny training runs, pruning from intermediate validation,
a study shared by worker processes on one SQLite file, a worker killed mid-trial, the best
trial exported as a config ``tokensieve train`` accepts, and bad input named."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tokensieve.cli import main
from tokensieve.config import load_config
from tokensieve.errors import TokensieveError
from tokensieve.integrations.optuna_search import run_search
from tokensieve.integrations.search_space import load_search
from tokensieve.train.trainer import TwoStageTrainer
from tokensieve.train.two_stage_config import TwoStageConfig

ROOT = Path(__file__).resolve().parent.parent


def write_search(folder: Path, model_dir: Path, steps: int = 2, **sections) -> Path:
    """A tiny training config and a search file over it in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train = {"model": str(model_dir),
             "merger": {"variant": "simple", "merge_ratio": 0.5, "d_internal": 16, "num_heads": 2},
             "pruner": {"d_internal": 16, "num_heads": 2},
             "optim": {"steps": steps, "batch_size": 2},
             "validation": {"every": 1, "samples": 4},
             "run": {"checkpoint_every": 1, "threads": 1}}
    (folder / "train.yaml").write_text(yaml.safe_dump(train))
    search = {"train": "train.yaml",
              "set": {"loss.distill": 0.5},
              "space": {"optim.lr_layer_pruners": {"low": 1e-4, "high": 1e-2, "log": True},
                        "merger.target_merge_tokens": {"low": 8, "high": 32},
                        "pruner.pruning_layers": {"choices": [[1], [1, 2]]},
                        "schedule.tau_kind": {"choices": ["exponential", "linear"]}},
              "study": {"sampler": "random", "seed": 0, "pruner": "none", "heartbeat_s": 1}}
    for section, values in sections.items():
        search[section] = {**search.get(section, {}), **values}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def study_of(path: Path, out: Path) -> optuna.Study:
    return optuna.load_study(study_name=path.stem, storage=f"sqlite:///{out / 'study.db'}")


def test_trials_report_every_validation_and_the_best_exports_a_trainable_config(tiny_llava_dir, tmp_path):
    path = write_search(tmp_path, tiny_llava_dir, objective={"flops_weight": 0.5})
    out = tmp_path / "out"
    result = run_search(path, 2, out=out)
    assert result["trials"] == {"complete": 2}
    study = study_of(path, out)
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2]  # validation.every 1, 2 steps
        cfg = trial.user_attrs["config"]
        assert cfg["loss"]["distill"] == 0.5 and cfg["pruner"]["pruning_layers"] in ([1], [1, 2])
        assert cfg["merger"]["target_merge_tokens"] == trial.params["merger.target_merge_tokens"]
        assert 0 < trial.user_attrs["flops_ratio"] < 1
        assert trial.value == pytest.approx(trial.user_attrs["val_accuracy"] - 0.5 * trial.user_attrs["flops_ratio"])
        assert (Path(trial.user_attrs["run_dir"]) / "done.json").is_file()
    best = json.loads((out / "best_trial.json").read_text())
    assert best["value"] == study.best_value and best["trial"] == study.best_trial.number
    exported = load_config(TwoStageConfig, out / "best_config.yaml")
    assert exported.optim.lr_layer_pruners == study.best_params["optim.lr_layer_pruners"]
    assert main(["train", str(out / "best_config.yaml"), "--out", str(tmp_path / "retrained")]) == 0


def test_a_trial_below_the_median_is_pruned_at_its_first_validation(tiny_llava_dir, tmp_path):
    path = write_search(tmp_path, tiny_llava_dir, steps=3,
                        study={"pruner": "median", "startup_trials": 1, "warmup_steps": 0})
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name=path.stem, storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 1.0, 2: 1.0, 3: 1.0}))
    result = run_search(path, 2, out=out)
    assert result["trials"] == {"complete": 1, "pruned": 1}
    pruned = study_of(path, out).trials[1]
    assert pruned.state == optuna.trial.TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    log = (Path(pruned.user_attrs["run_dir"]) / "log.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in log] == [1]  # training stopped there


def _worker(argv: list[str], hang_at_step: int | None = None) -> multiprocessing.Process:
    """A worker process running ``tokensieve ARGV`` (forked: it shares the imports already made).
    With ``hang_at_step`` its training hangs when it reaches that step, until it is killed."""

    def work():
        if hang_at_step is not None:
            original = TwoStageTrainer.train_step

            def hang(self, *args):
                while self.step == hang_at_step:
                    time.sleep(1)
                return original(self, *args)

            TwoStageTrainer.train_step = hang
        os._exit(main(argv))

    process = multiprocessing.get_context("fork").Process(target=work)
    process.start()
    return process


def test_two_worker_processes_share_one_sqlite_study(tiny_llava_dir, tmp_path):
    path = write_search(tmp_path, tiny_llava_dir)
    out = tmp_path / "out"
    workers = [_worker(["search", str(path), "--trials", "4", "--out", str(out)]) for _ in range(2)]
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    trials = study_of(path, out).trials
    assert len(trials) >= 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)
    assert {t.user_attrs["worker"].split(":")[1] for t in trials} <= {str(w.pid) for w in workers}
    assert (out / "best_config.yaml").is_file()


def test_a_killed_worker_leaves_a_study_that_another_worker_finishes(tiny_llava_dir, tmp_path):
    path = write_search(tmp_path, tiny_llava_dir, steps=4)
    out = tmp_path / "out"
    worker = _worker(["search", str(path), "--trials", "1", "--out", str(out)], hang_at_step=2)
    log = out / "trials" / "0000" / "log.jsonl"
    deadline = time.time() + 60
    while not log.exists() or len(log.read_text().splitlines()) < 2:
        assert time.time() < deadline and worker.is_alive()
        time.sleep(0.1)
    time.sleep(0.5)  # step 2 is logged and checkpointed; the worker now hangs before step 3
    worker.kill()
    worker.join()
    assert study_of(path, out).trials[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(3.0)  # no heartbeat for more than 2 x heartbeat_s: the trial is stale
    result = run_search(path, 1, out=out)
    assert result["trials"] == {"fail": 1, "complete": 1}
    dead, retried = study_of(path, out).trials
    assert retried.params == dead.params and retried.system_attrs["failed_trial"] == 0
    assert retried.user_attrs["run_dir"] == dead.user_attrs["run_dir"]
    assert [json.loads(row)["step"] for row in log.read_text().splitlines()] == [1, 2, 3, 4]  # resumed, not redone


def _cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokensieve: error: ") and "\n" not in err
    return err


def test_a_space_key_that_is_not_a_config_key_is_named(tiny_llava_dir, tmp_path, capsys):
    path = write_search(tmp_path, tiny_llava_dir, space={"merger.merge_ratoi": {"low": 0.1, "high": 0.5}})
    err = _cli_error(["search", str(path), "--trials", "1", "--out", str(tmp_path / "out")], capsys)
    assert "space key 'merger.merge_ratoi'" in err and "did you mean 'merge_ratio'" in err
    assert not (tmp_path / "out").exists()  # named before anything ran


@pytest.mark.parametrize("space, message", [
    ({"optim.steps": {"low": 1.5, "high": 4}}, "config key 'optim.steps' expects int, got 1.5"),
    ({"schedule.tau_kind": {"choices": ["cosine"]}}, "must be one of 'exponential', 'linear'"),
    ({"loss.sparsity": {"low": 2.0, "high": 1.0}}, "low 2.0 must be below high 1.0"),
    ({"loss.sparsity": {"low": 1.0}}, "a range needs both low and high"),
])
def test_bad_space_values_are_named(tiny_llava_dir, tmp_path, space, message):
    path = write_search(tmp_path, tiny_llava_dir, space=space)
    with pytest.raises(TokensieveError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_search(path)


@pytest.mark.parametrize("url", ["sqlite:////no/such/folder/study.db", "postgresql://user:secret@localhost:1/db",
                                 "not a url"])
def test_an_unusable_storage_is_named(tiny_llava_dir, tmp_path, capsys, url):
    path = write_search(tmp_path, tiny_llava_dir)
    err = _cli_error(["search", str(path), "--trials", "1", "--storage", url, "--out", str(tmp_path / "out")], capsys)
    assert "cannot open the study storage" in err and "secret" not in err
    assert not list((tmp_path / "out").glob("trials/*"))


def test_the_shipped_search_file_is_valid():
    search = load_search(ROOT / "src" / "tokensieve" / "configs" / "search_testbed.yaml")
    assert search.base["model"] is None and search.cfg.study.pruner == "median"
