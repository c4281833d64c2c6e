"""Data-parallel training across processes, on accelerate's process group.

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) every process holds the frozen
backbone and an identical copy of the small trainable parts (same seed, or the same
``state.pt``). Each step, a process takes its share of the step's batch, and after the backward
pass the gradients of the trainable parts alone are averaged across processes (the backbone has
none), so every copy takes the same optimizer step. Logged numbers are averaged and validation
counts summed across processes; only the main process writes the run folder.

In a single process every method here is the identity, so the default path is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch

from tokensieve.errors import TokensieveError
from tokensieve.optional import require

T = TypeVar("T")


class Distributed:
    """The processes of one training run. ``device``: the run's device (``cpu`` selects gloo)."""

    def __init__(self, device: str = "cpu"):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Reads the launcher's environment, joins the process group (nccl on GPUs, gloo on CPUs)
            # and makes this process's GPU the current one, so "cuda" means it.
            self.state = require("accelerate", "dist").PartialState(cpu=device == "cpu")

    @property
    def world_size(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise TokensieveError(f"optim.batch_size {batch_size} must be divisible by the {self.world_size} "
                                  "processes: each takes an equal share of every batch")

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th, from its rank."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def sync_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``parameters`` across processes (one all-reduce of them all);
        a missing gradient counts as zeros, so every process ends with the same ones."""
        if self.state is None:
            return
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def gather(self, items: list[T]) -> list[T]:
        """Every process's ``items`` (picklable), concatenated in rank order, on every process."""
        if self.state is None:
            return list(items)
        parts: list[list[T] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    def sum(self, values: Sequence[int]) -> list[int]:
        """Integers summed across processes (e.g. validation counts)."""
        if self.state is None:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64, device=self.state.device)
        torch.distributed.all_reduce(total)
        return [int(v) for v in total.tolist()]

    def average(self, row: dict) -> dict:
        """A log row with every number (and list of numbers) averaged across processes."""
        if self.state is None:
            return row
        keys = [k for k, v in row.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)]
        flat = [float(x) for k in keys for x in (row[k] if isinstance(row[k], list) else [row[k]])]
        values = torch.tensor(flat, dtype=torch.float64, device=self.state.device)
        torch.distributed.all_reduce(values)
        values = (values / self.world_size).tolist()
        out = dict(row)
        for k in keys:
            n = len(row[k]) if isinstance(row[k], list) else 1
            chunk, values = values[:n], values[n:]
            out[k] = chunk if isinstance(row[k], list) else chunk[0]
        return out
