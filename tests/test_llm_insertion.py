"""Tokens a method makes inside the LLM (SparseVLM's recycled tokens): inserted right after the kept
image tokens, positions renumbered, rows keeping different counts in one batch, and the signals
such a method reads (attention from every token after the image, the LLM's input embeddings)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.attach import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.llava_prompt import encode
from tokensieve.method import Method, Selection, SiteInputs


@dataclass
class _KeepAndSummarise(Method):
    """Row r keeps its first ``4 + r % 3`` image tokens and makes ``1 + r % 2`` tokens: the mean of
    the dropped ones, then (if two) their max; positions renumbered, as SparseVLM's code does."""

    name = "keep_and_summarise"
    stages = ("llm",)
    makes_extra_tokens = True
    renumbers_positions = True

    @property
    def count_per_row(self) -> bool:
        return True

    def select(self, inputs: SiteInputs) -> Selection:
        x = inputs.tokens
        b = x.shape[0]
        counts = torch.tensor([4 + r % 3 for r in range(b)])
        made = torch.tensor([1 + r % 2 for r in range(b)])
        indices = torch.arange(int(counts.max())).expand(b, -1)
        valid = indices < counts[:, None]
        dropped = [x[r, int(counts[r]):] for r in range(b)]
        most = int(made.max())  # slots every row has; rows making fewer pad theirs
        extra = torch.stack([torch.stack([d.mean(0), d.max(0).values]) for d in dropped])[:, :most]
        extra_valid = torch.arange(most).expand(b, -1) < made[:, None]
        return Selection(indices, valid=valid, extra=extra, extra_valid=extra_valid)


def _layer_input(backbone, batch, stages, layer: int):
    """What decoder ``layer`` receives (hidden states and position ids) with ``stages`` attached."""
    seen = {}

    def grab(_module, args, kwargs):
        seen["hidden"], seen["positions"] = (args[0] if args else kwargs["hidden_states"]), kwargs["position_ids"]

    handle = attach(backbone, stages)
    hook = backbone.llm_layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        backbone.forward(**batch)
    finally:
        hook.remove()
        handle.detach()
    return seen, handle


def test_made_tokens_follow_the_kept_ones_and_positions_close_the_gaps(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:1])  # one row: 4 kept, 1 made
    before, _ = _layer_input(backbone, batch, [("random", "llm.2", 64)], layer=1)  # the unpruned state entering 1
    after, handle = _layer_input(backbone, batch, [(_KeepAndSummarise(), "llm.1", 64)], layer=1)
    layout = backbone.layout(batch["input_ids"], batch["attention_mask"])
    start = int(layout.image_start[0])
    full = before["hidden"][0]
    image = full[start:start + 64]
    expected = torch.cat([full[:start], image[:4], image[4:].mean(0, keepdim=True), full[start + 64:]])
    torch.testing.assert_close(after["hidden"][0], expected)
    assert after["positions"][0].tolist() == list(range(expected.shape[0]))
    # The later layers attend causally over the new sequence at its renumbered positions: run them by
    # hand from what layer 1 received and compare the final states.
    final = []
    hook = backbone.language_model.norm.register_forward_hook(lambda _m, _a, out: final.append(out))
    handle = attach(backbone, [(_KeepAndSummarise(), "llm.1", 64)])
    try:
        backbone.forward(**batch)
    finally:
        handle.detach()
        hook.remove()
    h, positions = after["hidden"], after["positions"]
    rotary = backbone.language_model.rotary_emb(h, positions)
    with torch.no_grad():
        for layer in backbone.llm_layers[1:]:
            h = layer(h, position_embeddings=rotary, position_ids=positions)
    torch.testing.assert_close(final[0], backbone.language_model.norm(h), atol=1e-5, rtol=1e-5)
    assert handle.last_kept["keep_and_summarise@llm.1:64"][0].tolist() == [0, 1, 2, 3, -3]


def test_rows_keeping_and_making_different_counts_give_what_each_gives_alone(backbone, tiny_samples):
    """Row r of a batch keeps and makes as many as row r would alone only if padding slots are inert:
    rows are given the same index in both runs (the method decides by row index)."""
    for r in range(1, 4):
        samples = [tiny_samples[0]] * r + [tiny_samples[r]]
        together = _last_logits(backbone, encode(backbone.processor, samples))[-1]
        alone = _last_logits(backbone, encode(backbone.processor, [tiny_samples[r]] * (r + 1)))[-1]
        torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)


def _last_logits(backbone, batch):
    handle = attach(backbone, [(_KeepAndSummarise(), "llm.1", 64)])
    try:
        return backbone.forward(**batch, logits_to_keep=1).logits[:, -1]
    finally:
        handle.detach()


def test_cached_decoding_after_insertion_equals_recomputing(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:3])
    handle = attach(backbone, [(_KeepAndSummarise(), "llm.1", 64)])
    try:
        runs = [backbone.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=cache,
                                  output_scores=True, return_dict_in_generate=True) for cache in (True, False)]
    finally:
        handle.detach()
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for with_cache, without in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(with_cache, without, atol=2e-5, rtol=1e-5)


@dataclass
class _RecordEntry(Method):
    name = "record_entry"
    stages = ("llm",)
    signals = ("post_image_attention", "input_image_embeddings")

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen = {name: inputs.signal(name) for name in self.signals}
        self.seen["input_embeddings"] = inputs.question_signal("input_embeddings")
        self.seen["question"] = inputs.question()
        return Selection(torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1))


def test_signals_of_every_token_after_the_image_and_of_the_llm_input(tiny_llava_dir, tiny_samples):
    eager = LlavaBackbone.from_pretrained(tiny_llava_dir)
    eager.model.set_attn_implementation("eager")
    batch = encode(eager.processor, tiny_samples)
    inputs = eager.prepare(**batch)
    start = eager.layout(inputs.input_ids, inputs.attention_mask).image_start
    columns = start[:, None] + torch.arange(64)
    recorder = _RecordEntry()
    handle = attach(eager, [("random", "llm.1", 40), (recorder, "llm.2", 40)])
    try:
        out = eager.forward(**batch, output_attentions=True)  # layer 1 ran on the 40 kept image tokens
    finally:
        handle.detach()
    t = recorder.seen["question"][0].shape[1]  # the tokens after the image, left-padded
    embeds = inputs.inputs_embeds
    torch.testing.assert_close(recorder.seen["input_image_embeddings"],
                               embeds.gather(1, columns[..., None].expand(-1, -1, embeds.shape[-1])))
    torch.testing.assert_close(recorder.seen["input_embeddings"], embeds[:, -t:])
    kept = start[:, None] + torch.arange(40)  # the image run after the first stage
    expected = out.attentions[1].mean(1)[:, -t:].gather(2, kept[:, None, :].expand(-1, t, -1))
    torch.testing.assert_close(recorder.seen["post_image_attention"], expected, atol=1e-6, rtol=1e-5)
