"""Reading tensor values back to the host (a wait for the device on a GPU) in the pruned prefill:
after a stage's first pass, whose selection checks read values (docs/design.md), pruning on LLaVA-1.5
adds no read to the forward, and DART, which must read its pivots' positions (the released claiming
order is a Python set's), reads as often for six rows as for two. On Qwen-VL and LLaVA-NeXT, whose
stages choose row by row, pruning adds as many reads for four rows as for two, and the Qwen-VL adapter's own
code (pruned or not) reads as often for four rows as for two. Counted by intercepting
every torch call that returns values to Python, so the test runs on a CPU."""

from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from tiny_llava_next import ROWS as NEXT_ROWS
from tiny_llava_next import inputs as next_inputs
from tiny_qwen import ROWS as QWEN_ROWS
from tiny_qwen import inputs as qwen_inputs
from torch.overrides import TorchFunctionMode

from tokensieve.attach import attach
from tokensieve.method import Method, Selection, SiteInputs

VALUE_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.equal,
               torch.Tensor.equal, torch.masked_select, torch.Tensor.masked_select, torch.unique,
               torch.Tensor.unique}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}  # a bool mask index counts its True values


# An anyres image's layout is built on the host from its size (a video's from its frame count): what
# these modules read never waits for a device.
HOST_SIDE = ("anyres_layout.py", "pooled_video.py")


class HostReads(TorchFunctionMode):
    """Counts, by function name, the torch calls made inside it that read tensor values to the host, but
    for those made in the modules named in ``host_side`` (the innermost tokensieve file of the call); with
    ``ours_only``, only those that tokensieve's code makes itself (not the model's code it calls)."""

    def __init__(self, host_side: tuple[str, ...] = (), ours_only: bool = False):
        super().__init__()
        self.reads = Counter()
        self.host_side = host_side
        self.ours_only = ours_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = None
        if func in VALUE_READS:
            name = func.__name__
        elif func in INDEXING:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                name = "bool index"
        if name is not None and not self._on_host() and (not self.ours_only or self._ours()):
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _ours() -> bool:
        """Whether the innermost caller outside torch and this file is a tokensieve module."""
        callers = [f.filename for f in traceback.extract_stack()
                   if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
        return f"tokensieve{os.sep}" in callers[-1]

    def _on_host(self) -> bool:
        if not self.host_side:
            return False
        ours = [f.filename for f in traceback.extract_stack() if f"tokensieve{os.sep}" in f.filename]
        return bool(ours) and ours[-1].endswith(self.host_side)


def reads_of(backbone, batch, host_side: tuple[str, ...] = (), ours_only: bool = False) -> Counter:
    with torch.no_grad(), HostReads(host_side, ours_only) as mode:
        backbone.forward(**batch)
    return mode.reads


def test_the_counter_sees_a_read():
    with HostReads() as mode:
        x = torch.arange(4)
        int(x.sum()), x[x > 1], x.tolist()
    assert mode.reads == Counter({"__int__": 1, "bool index": 1, "tolist": 1})


@dataclass
class QuestionReader(Method):
    """Keeps the tokens most aligned with the mean of the question's states: reads the question, no value."""

    name = "question_reader"
    stages = ("llm",)

    def select(self, inputs: SiteInputs) -> Selection:
        states, valid = inputs.question()  # (B, T, d), (B, T)
        centre = (states * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)  # (B, d)
        scores = (inputs.tokens * centre[:, None]).sum(-1)  # (B, N)
        return Selection(scores.topk(inputs.keep, dim=1).indices.sort(1).values)


@pytest.mark.parametrize("method,site", [("random", "projector"), ("visionzip", "projector"),
                                         ("divprune", "llm.0"), ("fastv", "llm.2"),
                                         (QuestionReader(), "llm.0"), (QuestionReader(), "llm.2")], ids=str)
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


def added_reads(backbone, batches: dict, method: str, site: str) -> dict:
    """Per batch size, what pruning adds to the forward's reads after the stage's first pass (the model's
    own reads differ with padding, so each size is compared with its own unpruned forward)."""
    unpruned = {size: reads_of(backbone, batch, HOST_SIDE) for size, batch in batches.items()}
    handle = attach(backbone, method, 0.5, site=site, mode="hard")
    try:
        added = {}
        for size, batch in batches.items():
            reads_of(backbone, batch, HOST_SIDE)  # the first pass checks values
            added[size] = reads_of(backbone, batch, HOST_SIDE) - unpruned[size]
    finally:
        handle.detach()
    return added


@pytest.mark.parametrize("method,site", [("random", "llm.0"), ("divprune", "llm.0"), ("fastv", "llm.2")])
def test_qwen_pruning_reads_as_often_for_four_rows_as_for_two(qwen, method, site):
    """Rows of one image and of two (tiny_qwen.ROWS), twice over: no read per row or per image."""
    added = added_reads(qwen, {2: qwen_inputs(qwen, QWEN_ROWS), 4: qwen_inputs(qwen, QWEN_ROWS * 2)}, method, site)
    assert added[4] == added[2]


@pytest.mark.parametrize("method,site", [("random", "llm.0"), ("divprune", "llm.0"), ("fastv", "llm.2")])
def test_llava_next_pruning_reads_as_often_for_six_rows_as_for_three(llava_next, method, site):
    """A wide, a square and a tall image (tiny_llava_next.ROWS), twice over: no read per row or per image."""
    batches = {3: next_inputs(llava_next.processor, NEXT_ROWS), 6: next_inputs(llava_next.processor, NEXT_ROWS * 2)}
    added = added_reads(llava_next, batches, method, site)
    assert added[6] == added[3]


def adapter_reads(backbone, batches: dict, method: str | None, site: str | None, mode: str = "hard") -> dict:
    """Per batch size, the reads the adapter's own code makes in a forward (after a stage's first pass)."""
    handle = None if method is None else attach(backbone, method, 0.5, site=site, mode=mode)
    try:
        ours = {}
        for size, batch in batches.items():
            reads_of(backbone, batch)  # a stage's first pass checks values
            ours[size] = reads_of(backbone, batch, HOST_SIDE, ours_only=True)
    finally:
        if handle is not None:
            handle.detach()
    return ours


@pytest.mark.parametrize("method,site", [(None, None), ("random", "llm.0"), ("fastv", "llm.2")])
def test_the_qwen_adapter_reads_as_often_for_four_rows_as_for_two(qwen, method, site):
    """The adapter's own reads, pruned or not (the model's position ids read per row in transformers' code):
    the layout once, the grids; the shrunk batch's columns and layout come from counts known on the host."""
    ours = adapter_reads(qwen, {2: qwen_inputs(qwen, QWEN_ROWS), 4: qwen_inputs(qwen, QWEN_ROWS * 2)}, method, site)
    assert ours[4] == ours[2]
    assert "bool index" not in ours[2]


@pytest.mark.parametrize("method,site,mode", [(None, None, "hard"), ("random", "llm.0", "hard"),
                                              ("fastv", "llm.2", "hard"), ("random", "llm.0", "soft")])
def test_the_llava_next_adapter_reads_the_layout_and_the_image_sizes_only(llava_next, method, site, mode):
    """Pruned or not, for three rows or six: the prompts' layout (one wait: nonzero, then its values) and the
    image sizes; the assembled rows' places, layout and candidates come from what the host knows."""
    batches = {3: next_inputs(llava_next.processor, NEXT_ROWS), 6: next_inputs(llava_next.processor, NEXT_ROWS * 2)}
    ours = adapter_reads(llava_next, batches, method, site, mode)
    assert ours[3] == ours[6] == Counter({"nonzero": 1, "tolist": 2})
