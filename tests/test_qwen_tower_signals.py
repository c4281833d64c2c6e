"""The Qwen-VL towers' signals (``received_attention``, ``keys`` per merged token, :mod:`tokensieve.backbones.qwen_tower`)
on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, the CLS-attention methods' variants that read
them at ``projector``, and the one-line refusals of the methods' defaults (no CLS token in the towers).

The expected signals come from the model's own eager attention: the weights and keys its last vision
block's attention computed, recorded by wrapping the family's ``eager_attention_forward``, then taken
per merged token and out of Qwen2.5's window order here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
from tiny_qwen import assert_rows_alone_as_in_batch, kept_of

from tokensieve.attach import attach
from tokensieve.backbones import qwen_tower
from tokensieve.backbones.hf_qwen import MODEL_CLASSES, QwenVLBackbone
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs
from tokensieve.methods import create_method
from tokensieve.ops import topk_sorted

PORTS = {"fastervlm": {"importance": "received_attention"}, "vispruner": {"importance": "received_attention"},
         "visionzip": {"importance": "received_attention", "cls": "drop", "order": "positions"},
         "anchor": {"importance": "received_attention", "k_anchors": 2}}


@dataclass
class Probe(Method):
    """Keeps the first ``keep`` tokens and records the tower signals it was given."""

    name = "probe"
    signals = ("received_attention", "keys")
    seen: list = None

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen.append({name: inputs.signal(name) for name in self.signals})
        return Selection(torch.arange(inputs.keep)[None])


@pytest.fixture(scope="module")
def eager(qwen, tiny_qwen_dir):
    """The same tiny model with eager attention everywhere."""
    model = MODEL_CLASSES[qwen.family].from_pretrained(tiny_qwen_dir, attn_implementation="eager")
    return QwenVLBackbone(model.eval(), qwen.processor)


def model_attention(eager, mixed, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(weights, keys)`` of the last vision block in a forward pass: per attention span ``(1, H, T, T)``
    and ``(1, H, T, d_h)``, as the model's eager attention computed them."""
    last = eager.visual.blocks[-1].attn
    module = sys.modules[type(last).__module__]
    original, weights, keys = module.eager_attention_forward, [], []

    def recording(attn, query, key, value, attention_mask, **kwargs):
        out, w = original(attn, query, key, value, attention_mask, **kwargs)
        if attn is last:
            weights.append(w.detach())
            keys.append(key.detach())
        return out, w

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        eager.forward(**mixed)
    return weights, keys


def expected_signals(eager, mixed, monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Per image ``received_attention`` ``(N_i,)`` and ``keys`` ``(N_i, d_h)`` from the model's own attention."""
    weights, keys = model_attention(eager, mixed, monkeypatch)
    received = torch.cat([w[0].mean(0).sum(0) for w in weights])  # (S,) mean over heads, sum over queries
    key = torch.cat([k[0].mean(0) for k in keys])  # (S, d_h)
    unit, grid = eager.merge_unit, mixed["image_grid_thw"]
    received, key = received.view(-1, unit).mean(1), key.view(-1, unit, key.shape[-1]).mean(1)
    if eager.family == "qwen2_5_vl":  # the blocks run in window order; the merger's output does not
        from transformers.vision_utils import get_vision_window_index

        vc = eager.config.vision_config
        window_index, _ = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        assert not torch.equal(window_index, torch.arange(len(window_index)))
        back = torch.argsort(window_index)
        received, key = received[back], key[back]
    counts = eager.image_token_counts(grid)
    return {"received_attention": list(received.split(counts)), "keys": list(key.split(counts))}


def test_signals_equal_the_models_own_attention_per_image(eager, mixed, monkeypatch):
    expected = expected_signals(eager, mixed, monkeypatch)
    probe = Probe(seen=[])
    handle = attach(eager, probe, 2)
    try:
        with torch.no_grad():
            eager.forward(**mixed)
    finally:
        handle.detach()
    # the mixed batch: row 0 one 16-token image, row 1 a 6-token then a 16-token image
    assert [s["received_attention"].shape for s in probe.seen] == [(1, 16), (1, 6), (1, 16)]
    d_h = eager.visual.blocks[-1].attn.head_dim
    assert [s["keys"].shape for s in probe.seen] == [(1, 16, d_h), (1, 6, d_h), (1, 16, d_h)]
    for i, seen in enumerate(probe.seen):
        for name in ("received_attention", "keys"):
            torch.testing.assert_close(seen[name][0], expected[name][i], rtol=1e-5, atol=1e-6)
        # each image's span: its tokens receive the attention of its own patches only
        total = seen["received_attention"][0].sum() * eager.merge_unit
        assert torch.isclose(total, torch.tensor(float(expected["received_attention"][i].numel() * eager.merge_unit)))


def test_the_same_signals_with_the_models_sdpa_attention(qwen, eager, mixed, monkeypatch):
    """The adapter's own (sdpa) model gives the signals of the eager one: they are recomputed from the
    block's qkv, not read from its attention kernel; here a few queries at a time."""
    expected = expected_signals(eager, mixed, monkeypatch)
    monkeypatch.setattr(qwen_tower, "SLAB_ELEMENTS", 2 * 64 * 5)  # 5 queries of a 64-patch image per slab
    probe = Probe(seen=[])
    handle = attach(qwen, probe, 2, site="llm.0")
    try:
        with torch.no_grad():
            qwen.forward(**mixed)
    finally:
        handle.detach()
    for i, seen in enumerate(probe.seen):
        torch.testing.assert_close(seen["received_attention"][0], expected["received_attention"][i],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(PORTS))
def test_variants_run_keep_the_budget_and_keep_all_is_the_plain_model(qwen, mixed, plain, name):
    method = create_method(name, **PORTS[name])
    site = "projector"  # the methods' default site (anchor's own, vision.1, is not on Qwen)
    for budget, kept in ((4, [4, 4, 4]), (0.5, [8, 3, 8])):  # a count: that many of every image; a ratio: a share
        handle = attach(qwen, method, budget, site=site)
        try:
            with torch.no_grad():
                qwen.forward(**mixed)
            assert [len(k) for k in kept_of(handle)] == kept
        finally:
            handle.detach()
    handle = attach(qwen, method, 1.0, site=site)
    try:
        with torch.no_grad():
            torch.testing.assert_close(qwen.forward(**mixed).logits, plain, rtol=0, atol=0)
    finally:
        handle.detach()


def test_padded_batch_equals_each_row_alone(qwen, mixed):
    """Each image's signals come from its own attention span: a row chooses and merges alone as in the batch."""
    handle = attach(qwen, create_method("visionzip", **PORTS["visionzip"]), 0.5)
    try:
        assert_rows_alone_as_in_batch(qwen, mixed, handle, [[0], [1, 2]])  # images at llm.0
    finally:
        handle.detach()


def test_fastervlm_keeps_the_tokens_receiving_most_attention(qwen, eager, mixed, monkeypatch):
    expected = expected_signals(eager, mixed, monkeypatch)["received_attention"]
    handle = attach(qwen, create_method("fastervlm", **PORTS["fastervlm"]), 0.5)
    try:
        with torch.no_grad():
            qwen.forward(**mixed)
        for kept, att in zip(kept_of(handle), expected):
            assert torch.equal(kept, topk_sorted(att[None], round(att.numel() / 2))[0])
    finally:
        handle.detach()


@pytest.mark.parametrize(("request_", "words"), [
    ({"method": "fastervlm", "budget": 0.5},
     "fastervlm needs cls_attention, which the Qwen-VL towers do not have (no CLS token); "
     "use fastervlm(importance='received_attention')"),
    ({"method": "vispruner", "budget": 0.5}, "use vispruner(importance='received_attention')"),
    ({"method": "visionzip", "budget": 0.5},
     "use visionzip(importance='received_attention', cls='drop', order='positions') (the authors' Qwen2.5-VL port"),
    ({"method": create_method("visionzip", importance="received_attention"), "budget": 0.5},
     "visionzip adds tokens of its own, which the Qwen-VL backbone places inside the LLM only"),
    ({"method": "prumerge", "budget": 0.5},
     "prumerge needs last_block_cls_attention, which the Qwen-VL towers do not have (no CLS token); it has no"),
    ({"method": "anchor", "budget": 0.5, "site": "projector"}, "use anchor(importance='received_attention') (ours"),
    ({"method": [("divprune", "projector", 0.5), ("random", "llm.0", 0.5)]},
     "projector and llm.0 are the same tokens on Qwen-VL"),
])
def test_refused_at_attach_in_one_line(qwen, request_, words):
    with pytest.raises(TokensieveError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        attach(qwen, **request_)
    assert "\n" not in str(caught.value)
    assert not qwen.sessions
