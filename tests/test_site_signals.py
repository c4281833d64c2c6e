"""The signals the LLaVA adapter hands to methods, checked against independent computations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from tokensieve.attach import attach
from tokensieve.method import Method, Selection, SiteInputs


@dataclass
class _Record(Method):
    """Keeps the first tokens and records the signals it asks for."""

    name = "record_signals"
    wanted: tuple = ()
    wanted_question: tuple = ()
    seen: dict = field(default_factory=dict, metadata={"state": True})

    @property
    def signals(self):
        return self.wanted

    def select(self, inputs: SiteInputs) -> Selection:
        for name in self.wanted:
            self.seen[name] = inputs.signal(name)
        for name in self.wanted_question:
            self.seen["question:" + name] = inputs.question_signal(name)
        if self.wanted_question:
            self.seen["question"] = inputs.question()
            self.seen["texts"] = inputs.question_texts()
        return Selection(torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1))


def _run(backbone, batch, method, site):
    handle = attach(backbone, method, 8, site=site)
    try:
        backbone.forward(**batch)
    finally:
        handle.detach()
    return method.seen


def test_tower_signals_at_the_projector(backbone, batch):
    seen = _run(backbone, batch, _Record(wanted=("cls_token", "last_block_cls_attention", "last_block_keys")),
                "projector")
    tower = backbone.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    assert torch.equal(seen["cls_token"], tower[backbone.feature_hidden_index][:, 0])
    last = backbone.vision_layers[-1]
    normed = last.layer_norm1(tower[-2])  # what the last block's attention reads
    q, k = last.self_attn.q_proj(normed), last.self_attn.k_proj(normed)
    weights = (q[:, :1] @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)[:, 0, 1:]  # one head, full width
    torch.testing.assert_close(seen["last_block_cls_attention"], weights)
    torch.testing.assert_close(seen["last_block_keys"], k[:, 1:])


def test_llm_signals_of_the_previous_layer_and_the_question(backbone, batch, tiny_samples):
    seen = _run(backbone, batch, _Record(wanted=("prev_layer_keys", "normed_states", "positions"),
                                         wanted_question=("prev_layer_keys", "normed_states", "positions")), "llm.2")
    inputs = backbone.prepare(**batch)
    out = backbone.model(**inputs.model_kwargs(), use_cache=True, output_hidden_states=True)
    cached = out.past_key_values.layers[1].keys  # (B, H, L, d_head): layer 1's keys after RoPE
    keys = cached.transpose(1, 2).reshape(cached.shape[0], cached.shape[2], -1)
    start = backbone.layout(inputs.input_ids, inputs.attention_mask).image_start
    columns = start[:, None] + torch.arange(64)
    normed = backbone.language_model.norm(out.hidden_states[2])  # the state entering layer 2, normalised
    pick = lambda x, c: x.gather(1, c[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    torch.testing.assert_close(seen["prev_layer_keys"], pick(keys, columns))
    torch.testing.assert_close(seen["normed_states"], pick(normed, columns))
    states, valid = seen["question"]
    t = states.shape[1]
    torch.testing.assert_close(seen["question:prev_layer_keys"], keys[:, -t:])
    torch.testing.assert_close(seen["question:normed_states"], normed[:, -t:])
    positions = inputs.attention_mask.cumsum(1) - 1  # each token's index in its unpadded row
    assert torch.equal(seen["positions"], positions.gather(1, columns))
    assert torch.equal(seen["question:positions"], positions[:, -t:])
    assert valid.shape == states.shape[:2]
    for text, sample in zip(seen["texts"], tiny_samples):  # the testbed's word-level tokenizer spaces words
        assert "".join(text.split()) == "".join(sample.question.split())  # the question alone, no answer cue


def test_a_signal_the_site_lacks_is_named(backbone, batch):
    from tokensieve.errors import TokensieveError

    with pytest.raises(TokensieveError, match="record_signals needs cls_token, which llm.2 does not provide"):
        _run(backbone, batch, _Record(wanted=("cls_token",)), "llm.2")


def test_positions_after_an_earlier_drop_are_the_kept_tokens_own(backbone, batch):
    recorder = _Record(wanted=("positions",))
    handle = attach(backbone, [("random", "llm.1", 32), (recorder, "llm.2", 8)])
    try:
        backbone.forward(**batch)
    finally:
        handle.detach()
    kept = handle.last_kept["random@llm.1:32"]  # (B, 32) patch indices
    inputs = backbone.prepare(**batch)
    start = backbone.layout(inputs.input_ids, inputs.attention_mask).image_start
    first = (inputs.attention_mask.cumsum(1) - 1).gather(1, start[:, None])  # position of each row's first patch
    assert torch.equal(recorder.seen["positions"], first + kept)
