"""Which images or rows a stage of the row-wise sessions (Qwen-VL, LLaVA-NeXT) gives a method in one call.

Each image (before the LLM) or row (inside it) is chosen as if alone; consecutive ones of one size can go
to the method as the rows of one batch. On an accelerator that pays: a method's operators are launched
once for them all, and a value it reads is read once. On a CPU it does not: a row's ``N x N`` or ``N x d``
work stays in cache, a batch's does not (DART and DivPrune, measured on the LLaVA-NeXT CPU shape's 2,880
tokens at batch 8, chose more slowly in one call than in eight). So on a CPU each goes alone, unless
:data:`BATCH_ON_CPU` is set (the tests set it, to run the batched path).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

BATCH_ON_CPU = False


def call_runs(sizes: Sequence[Hashable], device: torch.device) -> list[list[int]]:
    """Runs of consecutive indices of ``sizes`` (per image or row, what must be equal to share a call: its
    kind and token count, say) that go to a method in one call, in order; on a CPU one index each."""
    together = device.type != "cpu" or BATCH_ON_CPU
    runs: list[list[int]] = []
    for i, size in enumerate(sizes):
        if runs and together and sizes[runs[-1][0]] == size:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
