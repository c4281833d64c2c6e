"""Data-parallel training in two CPU processes (gloo), as ``torchrun --nproc_per_node 2 -m
tokensieve train`` runs it: each process takes half of every batch, the trainable parts'
gradients are averaged so both copies stay identical, only the main process writes the run
folder, and validation counts are summed across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from tokensieve.cli import main
from tokensieve.config import load_config
from tokensieve.distributed import Distributed
from tokensieve.errors import TokensieveError
from tokensieve.train.trainer import TwoStageTrainer
from tokensieve.train.two_stage_config import TwoStageConfig

from tiny_two_stage import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_two_processes(work, *args) -> None:
    """``work(rank, *args)`` in two forked processes that form a gloo group through the
    environment ``torchrun`` sets; fails if either fails."""
    port = _free_port()

    def child(rank: int):
        os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process has not met accelerate yet
        try:
            work(rank, *args)
            if torch.distributed.is_initialized():
                # Rank 0 hosts the rendezvous store: leaving before rank 1 is done (say, right
                # after an expected error) resets rank 1's connection on a loaded machine.
                torch.distributed.barrier()
        except BaseException as err:  # report, then fail the process
            print(f"rank {rank}: {type(err).__name__}: {err}", flush=True)
            os._exit(1)
        os._exit(0)

    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=child, args=(rank,)) for rank in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]


def _helper_checks(rank: int, out) -> None:
    dist = Distributed("cpu")
    assert (dist.world_size, dist.rank, dist.is_main) == (2, rank, rank == 0)
    assert dist.shard(list(range(5))) == [[0, 2, 4], [1, 3]][rank]
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((3,), float(rank + 1))  # q has no gradient on either rank
    dist.sync_gradients([p, q])
    assert torch.equal(p.grad, torch.full((3,), 1.5)) and torch.equal(q.grad, torch.zeros(2))
    assert dist.average({"loss": float(rank), "keep_ratio": [rank, 1.0], "note": "x"}) == \
        {"loss": 0.5, "keep_ratio": [0.5, 1.0], "note": "x"}
    assert dist.sum([rank, 1]) == [1, 2]


def test_shards_gradients_and_metrics_across_two_processes(tmp_path):
    run_in_two_processes(_helper_checks, tmp_path)


def _train(rank: int, config_path, out, parts_out) -> None:
    assert main(["train", str(config_path), "--out", str(out)]) == 0
    # What each process ends with (the run folder only has the main process's copy).
    parts = TwoStageTrainer.last_parts
    torch.save(parts, parts_out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_run(tiny_llava_dir, tmp_path_factory):
    """A tiny run trained by two processes, with the parts each process ended with."""
    folder = tmp_path_factory.mktemp("ddp")
    from tokensieve.config import save_config

    cfg = tiny_config(tiny_llava_dir, optim={"steps": 3, "batch_size": 4}, validation={"every": 1, "samples": 8})
    save_config(cfg, folder / "config.yaml")
    original = TwoStageTrainer.run

    def keep_parts(self):  # test hook: remember this process's final parts
        result = original(self)
        TwoStageTrainer.last_parts = {k: v.clone() for k, v in self.parts.state_dict().items()}
        return result

    TwoStageTrainer.run = keep_parts
    try:
        run_in_two_processes(_train, folder / "config.yaml", folder / "run", folder)
    finally:
        TwoStageTrainer.run = original
    return folder


def test_both_processes_end_with_the_same_trained_parts(two_process_run):
    first, second = (torch.load(two_process_run / f"rank{r}.pt") for r in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    saved = load_file(two_process_run / "run" / "parts.safetensors")
    assert all(torch.equal(saved[k], first[k]) for k in saved)
    fresh = TwoStageTrainer(load_config(TwoStageConfig, two_process_run / "config.yaml"), two_process_run / "fresh",
                            progress=False).parts.state_dict()
    assert any(not torch.equal(fresh[k], first[k]) for k in saved)  # they trained


def test_the_main_process_alone_writes_the_run_folder_with_gathered_validation(two_process_run):
    run = two_process_run / "run"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per step, not one per process
    assert json.loads((run / "done.json").read_text())["steps"] == 3
    assert (run / "best" / "parts.safetensors").is_file() and (run / "state.pt").is_file()
    # The last validation, summed over both halves of the set, equals one process validating all of it.
    trainer = TwoStageTrainer(load_config(TwoStageConfig, run / "config.yaml"), two_process_run / "single",
                              progress=False)
    trainer.parts.load_state_dict(torch.load(two_process_run / "rank0.pt"))
    assert rows[-1]["val_accuracy"] == pytest.approx(trainer.validate())


def _indivisible(rank: int, config_path, out) -> None:
    with pytest.raises(TokensieveError, match="optim.batch_size 3 must be divisible by the 2 processes"):
        TwoStageTrainer(load_config(TwoStageConfig, config_path), out, progress=False)


def test_a_batch_that_does_not_split_evenly_is_refused(tiny_llava_dir, tmp_path):
    from tokensieve.config import save_config

    save_config(tiny_config(tiny_llava_dir, optim={"steps": 1, "batch_size": 3}), tmp_path / "config.yaml")
    run_in_two_processes(_indivisible, tmp_path / "config.yaml", tmp_path / "run")


def _evaluate(rank: int, args: list[str], counts) -> None:
    import tokensieve.evaluate.scorer as scorer

    answered, real_predict = [], scorer.predict

    def counting(backbone, items, *rest, **kwargs):
        answered.extend(item.question_id for item in items)
        return real_predict(backbone, items, *rest, **kwargs)

    scorer.predict = counting
    assert main(args) == 0
    (counts / f"rank{rank}.json").write_text(json.dumps(answered))


def test_eval_in_two_processes_scores_each_item_once_and_reports_what_one_process_does(tiny_llava_dir, tmp_path):
    from tokensieve.evaluate.report import load_report

    args = ["eval", "--model", str(tiny_llava_dir), "--method", "random,fastv", "--budget", "8", "--samples", "10",
            "--batch-size", "3", "--timing-samples", "0", "--kept-examples", "0", "--json", "--out"]
    run_in_two_processes(_evaluate, [*args, str(tmp_path / "two")], tmp_path)
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted([str(i) for i in range(10)] * 3)
    assert main([*args, str(tmp_path / "one")]) == 0
    two, one = load_report(tmp_path / "two"), load_report(tmp_path / "one")
    assert two["rows"] == one["rows"]
    lines = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 3 * 10  # the main process alone wrote each run's 10 items, once each
    assert lines[1:] == (tmp_path / "one" / "samples.jsonl").read_text().splitlines()[1:]
