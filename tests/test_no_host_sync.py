"""The hot path does not wait for the device: after a stage's first forward pass, a pruned pass reads
nothing back from the tensors that the unpruned model does not (issue 27), and the checks that read a
selection's values run on the first pass only, or on every pass when asked (docs/design.md).

On the CPU nothing waits, so the calls that would wait on a GPU are counted instead, by a
``TorchFunctionMode`` that sees every tensor method called from Python: reading a value (``item``,
``bool``/``int``/``float`` of a tensor, ``tolist``, ``cpu``, ``numpy``, ``equal``) or a shape that
depends on values (``nonzero``, ``unique``, ``masked_select``, indexing by a boolean mask).
"""

from __future__ import annotations

import collections
import traceback
from dataclasses import dataclass

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import CLIPVisionConfig, CLIPVisionModel

from tokensieve.attach import attach
from tokensieve.backbones.hf_clip import HFClipViTBackbone
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection

WAITING = frozenset({"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "equal",
                     "nonzero", "unique", "masked_select"})
LLAVA_STAGES = [("visionzip", "projector", 32), ("divprune", "llm.0", 16), ("fastv", "llm.2", 8)]


class WaitCounter(TorchFunctionMode):
    """Counts the calls that wait for the device, by ``(call, caller's file, caller's function)``."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") else ()
        masks = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (index if isinstance(index, tuple) else (index,)))
        if name in WAITING or masks:
            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            self.calls[(name, caller.filename.rsplit("/", 2)[-1], caller.name)] += 1
        return func(*args, **(kwargs or {}))


def waits_of_second_pass(run) -> collections.Counter:
    """The waiting calls of ``run()``'s second call (the first one checks each stage's values)."""
    with torch.no_grad():
        run()
        with WaitCounter() as counter:
            run()
    return counter.calls


def test_a_pruned_llava_pass_waits_no_more_than_the_unpruned_one(backbone, batch):
    unpruned = waits_of_second_pass(lambda: backbone.forward(**batch))
    handle = attach(backbone, LLAVA_STAGES)
    try:
        pruned = waits_of_second_pass(lambda: backbone.forward(**batch))
        assert handle.last_counts == {"visionzip@projector:32": (64, 32), "divprune@llm.0:16": (32, 16),
                                      "fastv@llm.2:8": (16, 8)}
    finally:
        handle.detach()
    assert pruned == unpruned, f"more in the pruned pass: {sorted((pruned - unpruned).items())}"
    # The adapter reads the prompt's layout back once a pass (its refusals and each row's geometry together).
    adapter = {call: n for call, n in unpruned.items() if call[1] in ("hf_llava.py", "llava_assembly.py")}
    assert adapter == {("tolist", "hf_llava.py", "layout"): 1}


def test_pruned_llava_decoding_waits_no_more_than_unpruned(backbone, batch):
    def run():
        return backbone.generate(**batch, max_new_tokens=3, do_sample=False)
    unpruned = waits_of_second_pass(run)
    handle = attach(backbone, LLAVA_STAGES)
    try:
        pruned = waits_of_second_pass(run)
    finally:
        handle.detach()
    assert pruned == unpruned, f"more in the pruned pass: {sorted((pruned - unpruned).items())}"


def test_checking_every_pass_is_seen_by_the_counter(backbone, batch):
    """The counter sees the value checks when they run on every pass (so it would see them on the hot path)."""
    handle = attach(backbone, LLAVA_STAGES, check="always")
    try:
        pruned = waits_of_second_pass(lambda: backbone.forward(**batch))
    finally:
        handle.detach()
    assert any(file == "stage_plan.py" and function == "check_selection" for _, file, function in pruned)


def test_a_pruned_vit_pass_does_not_wait():
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=32, patch_size=4)).eval()
    backbone, pixels = HFClipViTBackbone(model), torch.randn(3, 3, 32, 32)
    unpruned = waits_of_second_pass(lambda: backbone.encode_images(pixels))
    handle = attach(backbone, [("visionzip", "vision.1", 24), ("tome", "vision.2", 12)])
    try:
        pruned = waits_of_second_pass(lambda: backbone.encode_images(pixels))
        assert handle.last_counts == {"visionzip@vision.1:24": (64, 24), "tome@vision.2:12": (24, 12)}
    finally:
        handle.detach()
    assert pruned == unpruned, f"more in the pruned pass: {sorted((pruned - unpruned).items())}"


@dataclass
class _UnsortedAfterFirst(Method):
    """Keeps the first ``keep`` tokens; from its second call on, in reverse order (not sorted)."""

    name = "unsorted_after_first"
    stages = ("projector",)
    calls: int = 0

    def select(self, inputs):
        self.calls += 1
        index = torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1)
        return Selection(index if self.calls == 1 else index.flip(1))


@pytest.mark.parametrize("how", ["default", "argument", "environment"])
def test_values_are_checked_on_the_first_pass_or_on_every_pass_when_asked(backbone, batch, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("TOKENSIEVE_CHECK", "always")
    handle = attach(backbone, _UnsortedAfterFirst(), 8, site="projector",
                    check="always" if how == "argument" else None)
    try:
        with torch.no_grad():
            backbone.forward(**batch)  # sorted: passes its check
            if how == "default":
                backbone.forward(**batch)  # checked once per attach: not read again
            else:
                with pytest.raises(TokensieveError, match="kept indices must be sorted and unique"):
                    backbone.forward(**batch)
    finally:
        handle.detach()


def test_a_first_pass_is_always_checked(backbone, batch):
    method = _UnsortedAfterFirst(calls=1)  # unsorted from its first call
    handle = attach(backbone, method, 8, site="projector")
    try:
        with torch.no_grad(), pytest.raises(TokensieveError, match="kept indices must be sorted and unique"):
            backbone.forward(**batch)
    finally:
        handle.detach()


def test_an_unknown_check_is_refused(backbone):
    with pytest.raises(TokensieveError, match="unknown check 'sometimes'"):
        attach(backbone, "fastv", 8, check="sometimes")
