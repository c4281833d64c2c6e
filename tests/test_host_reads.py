"""Reading tensor values back to the host (a wait for the device on a GPU) in the pruned prefill:
after a stage's first pass, whose selection checks read values (docs/design.md), pruning on LLaVA-1.5
adds no read to the forward, and DART, which must read its pivots' positions (the released claiming
order is a Python set's), reads as often for six rows as for two. Counted by intercepting every
torch call that returns values to Python, so the test runs on a CPU."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tokensieve.attach import attach

VALUE_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.equal,
               torch.Tensor.equal, torch.masked_select, torch.Tensor.masked_select, torch.unique,
               torch.Tensor.unique}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}  # a bool mask index counts its True values


class HostReads(TorchFunctionMode):
    """Counts, by function name, the torch calls made inside it that read tensor values to the host."""

    def __init__(self):
        super().__init__()
        self.reads = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in VALUE_READS:
            self.reads[func.__name__] += 1
        elif func in INDEXING:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.reads["bool index"] += 1
        return func(*args, **(kwargs or {}))


def reads_of(backbone, batch) -> Counter:
    with torch.no_grad(), HostReads() as mode:
        backbone.forward(**batch)
    return mode.reads


def test_the_counter_sees_a_read():
    with HostReads() as mode:
        x = torch.arange(4)
        int(x.sum()), x[x > 1], x.tolist()
    assert mode.reads == Counter({"__int__": 1, "bool index": 1, "tolist": 1})


@pytest.mark.parametrize("method,site", [("random", "projector"), ("visionzip", "projector"),
                                         ("divprune", "llm.0"), ("fastv", "llm.2")])
def test_pruning_adds_no_read_after_the_first_pass(backbone, batch, method, site):
    unpruned = reads_of(backbone, batch)
    handle = attach(backbone, method, 0.5, site=site, mode="hard")
    try:
        first = reads_of(backbone, batch)
        later = reads_of(backbone, batch)
    finally:
        handle.detach()
    assert sum(first.values()) > sum(unpruned.values())  # the first pass checks the selection's values
    assert later == unpruned


def test_dart_reads_as_often_for_six_rows_as_for_two(backbone, batch):
    """What DART adds to the forward's reads (the model's own differ with padding) is the same for any batch."""
    two = {key: value[:2] for key, value in batch.items()}
    unpruned = {6: reads_of(backbone, batch), 2: reads_of(backbone, two)}
    handle = attach(backbone, "dart", 0.5, mode="hard")
    try:
        reads_of(backbone, batch)  # the first pass checks values
        added = {6: reads_of(backbone, batch) - unpruned[6], 2: reads_of(backbone, two) - unpruned[2]}
    finally:
        handle.detach()
    assert added[6] == added[2]
    assert added[6]["tolist"] >= 1  # the pivots' positions, read once
