"""Pruning stages on the Qwen-VL adapter on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: the
site ``llm.0`` (the patch merger's output), chosen per image, assembled through the ``kept=`` path. A padded batch
against each row alone, and generate with the cache, for every method: test_family_contract.py."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from select_spy import rows_per_call
from tiny_clip_text import save_tiny_clip
from tiny_qwen import ROWS, inputs, kept_of

from tokensieve.attach import attach
from tokensieve.backbones import call_runs
from tokensieve.backbones.base import Backbone, Site
from tokensieve.backbones.qwen_prompt import image_questions
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs

METHODS = ("random", "divprune")


@dataclass
class Scaled(Method):
    """Keeps the first ``keep`` tokens, their values times ``scale``; records what it saw."""

    name = "scaled"
    signals = ("projector_input",)
    scale: float = 1.0
    seen: list = None

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen.append((inputs.tokens, inputs.signal("projector_input")))
        idx = torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1)
        return Selection(idx, tokens=inputs.tokens[:, : inputs.keep] * self.scale)


@dataclass
class MakesTokens(Method):
    name = "makes_tokens"
    makes_extra_tokens = True


def test_sites_and_signals(qwen):
    assert isinstance(qwen, Backbone)
    assert qwen.sites()[:2] == [Site("projector"), Site("llm", 0)]  # then llm.k (tests/test_qwen_llm_sites.py)
    tower = {"projector_input", "received_attention", "keys"}  # no cls_attention: no CLS in the tower
    assert qwen.signals_at(Site("llm", 0)) == qwen.signals_at(Site("projector")) == tower
    assert qwen.signals_at(Site("vision", 1)) == set()


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_the_plain_model(qwen, mixed, plain, method):
    handle = attach(qwen, method, 1.0, site="llm.0")
    with torch.no_grad():
        assert torch.equal(qwen.forward(**mixed).logits, plain)
    handle.detach()


@pytest.mark.parametrize("method", METHODS)
def test_hard_equals_the_kept_path_with_budgets_per_image(qwen, mixed, plain, method):
    handle = attach(qwen, method, 0.5, site="llm.0")
    with torch.no_grad():
        pruned = qwen.forward(**mixed).logits
        kept = kept_of(handle)
        assert [len(k) for k in kept] == [8, 3, 8]  # half of 16, 6 and 16 tokens
        assert handle.last_counts == {f"{method}@llm.0:0.5": (13, 6)}  # means over the three images
        assert handle.last_kept[f"{method}@llm.0:0.5"].shape == (3, 8)
        with handle.disabled():
            assert torch.equal(qwen.forward(**mixed).logits, plain)
        handle.detach()
        assert torch.equal(pruned, qwen.forward(**mixed, kept=kept).logits)
        assert torch.equal(qwen.forward(**mixed).logits, plain), "detach restores the model bit for bit"


def test_count_budget_keeps_that_many_of_every_image(qwen, mixed):
    handle = attach(qwen, "divprune", 5)
    with torch.no_grad():
        qwen.forward(**mixed)
    assert [len(k) for k in kept_of(handle)] == [5, 5, 5]
    assert handle.last_counts == {"divprune@llm.0:5": (13, 5)}
    handle.detach()


def test_merged_values_replace_the_kept_tokens_and_projector_input_is_the_merger_input(qwen, mixed):
    seen, outputs = [], []
    with torch.no_grad():
        for scale in (1.0, 2.0):
            handle = attach(qwen, Scaled(scale=scale, seen=seen), 0.5, site="llm.0")
            outputs.append(qwen.forward(**mixed).logits)
            handle.detach()
        assert torch.equal(outputs[0], qwen.forward(**mixed, kept=[torch.arange(k) for k in (8, 3, 8)]).logits)
        assert not torch.equal(outputs[0], outputs[1])
        d_vision = seen[0][1].shape[-1] // qwen.merge_unit
        for tokens, merger_input in seen[:3]:  # the merger's input per token gives the token (window order undone)
            for row in range(len(tokens)):
                torch.testing.assert_close(qwen.visual.merger(merger_input[row].reshape(-1, d_vision)), tokens[row])


@pytest.mark.parametrize("method", METHODS)
def test_consecutive_images_of_one_count_are_chosen_in_one_call_as_each_alone(qwen, method, monkeypatch):
    """Two 16-token images (rows 0 and 1), then a 6-token one: two calls, the first of two rows (as on an
    accelerator; on a CPU each image goes alone); each image keeps what it keeps when its row runs alone."""
    rows = [ROWS[0], ("what shape is left and right ?", ["big", "small"])]
    calls = rows_per_call(monkeypatch, method)
    monkeypatch.setattr(call_runs, "BATCH_ON_CPU", True)
    handle = attach(qwen, method, 0.5, site="llm.0")
    try:
        with torch.no_grad():
            qwen.forward(**inputs(qwen, rows))
            together = kept_of(handle)
            assert calls == [2, 1]
            alone = []
            for row in (0, 1):
                qwen.forward(**inputs(qwen, rows[row: row + 1], first=row))  # the same images as in the batch
                alone += kept_of(handle)
    finally:
        handle.detach()
    assert [k.tolist() for k in together] == [k.tolist() for k in alone]


def test_cdpruner_reads_each_images_question_and_merger_input(qwen, mixed, tmp_path):
    layout = qwen.layout(mixed["input_ids"], mixed["attention_mask"])
    assert image_questions(qwen.processor.tokenizer, mixed["input_ids"], layout) == [
        "what is the colour ?", "what shape is left and right ?", "what shape is left and right ?"]
    d_vision = qwen.visual.blocks[0].norm1.weight.shape[0]
    clip = save_tiny_clip(tmp_path, qwen.merge_unit * d_vision)  # a CLIP as wide as the merger's input per token
    handle = attach(qwen, {"name": "cdpruner", "text_encoder": str(clip)}, 0.5)  # its default site: llm.0
    with torch.no_grad():
        pruned, kept = qwen.forward(**mixed).logits, kept_of(handle)
        handle.detach()
        assert [len(k) for k in kept] == [8, 3, 8]
        assert torch.equal(pruned, qwen.forward(**mixed, kept=kept).logits)


@pytest.mark.parametrize(("request_", "words"), [
    ({"method": "fastv", "budget": 0.5, "site": "llm.0"}, "fastv needs text_attention, which llm.0 does not provide"),
    ({"method": "divprune", "budget": 0.5, "site": "vision.1"}, "site vision.1 does not exist on the Qwen-VL backbone yet"),
    ({"method": "fastervlm", "budget": 0.5, "site": "llm.0"}, "'fastervlm' cannot act at llm.0"),
    ({"method": "divprune", "budget": 100}, "budget of 100 tokens is larger than the 64 visual tokens at llm.0"),
    ({"method": MakesTokens(), "budget": 0.5, "site": "llm.0"}, "makes_tokens adds tokens of its own"),
])
def test_refused_at_attach_in_one_line(qwen, request_, words):
    with pytest.raises(TokensieveError, match=words) as caught:
        attach(qwen, **request_)
    assert "\n" not in str(caught.value)
    assert not qwen.sessions


def test_refused_at_forward_in_one_line(qwen, mixed):
    handle = attach(qwen, "divprune", 10)
    try:
        for call, words in [(lambda: qwen.forward(**mixed), "image 1 gives 6 visual tokens, fewer than the budget of 10"),
                            (lambda: qwen.forward(**mixed, kept=[torch.arange(2)] * 3), "kept= and an attached"),
                            (lambda: attach(qwen, "random", 0.5, site="llm.0"), "one attached handle at a time")]:
            with pytest.raises(TokensieveError, match=words) as caught:
                call()
            assert "\n" not in str(caught.value)
    finally:
        handle.detach()
    assert not qwen.sessions


@dataclass
class BackwardsOnSecondImage(Method):
    """Keeps the first ``keep`` tokens, but in descending order in the second call (the second image size)."""

    name = "backwards_on_second_image"
    shown: int = 0

    def select(self, inputs: SiteInputs) -> Selection:
        self.shown += 1
        idx = torch.arange(inputs.keep).expand(len(inputs.tokens), -1)
        return Selection(idx.flip(1) if self.shown == 2 else idx)


def test_every_image_of_the_first_pass_is_checked(qwen, mixed):
    """The plan checks a selection's values on a stage's first pass only: on Qwen-VL that pass is
    every call for the batch's images (one per image size), not its first call alone."""
    handle = attach(qwen, BackwardsOnSecondImage(), 4, site="llm.0")
    try:
        with pytest.raises(TokensieveError, match="kept indices must be sorted and unique"), torch.no_grad():
            qwen.forward(**mixed)
    finally:
        handle.detach()
