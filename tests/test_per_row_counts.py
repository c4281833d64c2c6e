"""A stage inside the LLM that keeps a count per row (the layer pruner with a keep threshold):
DESIGN.md's invariants still hold when rows of a batch keep different numbers of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tokensieve.attach import attach
from tokensieve.backbones.llava_prompt import encode
from tokensieve.backbones.stage_plan import PADDING
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.flops import token_counts
from tokensieve.learned import LayerPrunerHead
from tokensieve.method import Method, Selection, SiteInputs
from tokensieve.methods.layer_pruner import LearnedLayerPruner


def threshold_pruner(backbone, seed: int = 0, threshold: float = 0.5) -> LearnedLayerPruner:
    """A head with random output weights, so keep probabilities spread around 0.5."""
    torch.manual_seed(seed)
    head = LayerPrunerHead(backbone.config.text_config.hidden_size, 16, 2, init_keep_bias=0.0).eval()
    torch.nn.init.normal_(head.mlp[-1].weight, std=2.0)
    return LearnedLayerPruner(threshold=threshold, module=head)


def last_logits(backbone, batch) -> torch.Tensor:
    return backbone.forward(**batch, logits_to_keep=1).logits[:, -1]


def run(backbone, stages, batch, mode="hard"):
    handle = attach(backbone, stages, mode=mode)
    try:
        return last_logits(backbone, batch), handle
    finally:
        handle.detach()


def real_counts(kept: torch.Tensor) -> list[int]:
    return (kept != PADDING).sum(1).tolist()


def test_rows_keep_their_own_count_and_a_batch_equals_each_row_alone(backbone, tiny_samples, batch):
    stages = [(threshold_pruner(backbone), "llm.1", 1.0)]
    together, handle = run(backbone, stages, batch)
    (kept,) = handle.last_kept.values()
    counts = real_counts(kept)
    assert len(set(counts)) > 1, "the rows must keep different counts for this test to mean anything"
    alone = [run(backbone, stages, encode(backbone.processor, [s])) for s in tiny_samples]
    assert [real_counts(next(iter(h.last_kept.values())))[0] for _, h in alone] == counts
    torch.testing.assert_close(together, torch.cat([logits for logits, _ in alone]), atol=2e-5, rtol=1e-5)


def test_soft_binary_mask_equals_hard_removal_with_a_count_per_row(backbone, batch):
    stages = [(threshold_pruner(backbone), "llm.1", 1.0)]
    hard, hard_handle = run(backbone, stages, batch, "hard")
    soft, soft_handle = run(backbone, stages, batch, "soft")
    torch.testing.assert_close(soft, hard, atol=2e-5, rtol=1e-5)
    assert torch.equal(next(iter(hard_handle.last_kept.values())), next(iter(soft_handle.last_kept.values())))


def test_padding_changes_nothing_that_removal_would_not(backbone, batch):
    """The padded slots are real tokens carried along; were they attended, the batch would differ."""
    pruned, handle = run(backbone, [(threshold_pruner(backbone), "llm.1", 1.0)], batch)
    (kept,) = handle.last_kept.values()
    assert (kept == PADDING).any()
    plain = last_logits(backbone, batch)
    assert not torch.allclose(pruned, plain)


def test_cached_decoding_equals_recomputing_and_each_row_alone(backbone, tiny_samples, batch):
    """The padding's key mask follows the cache: new tokens never attend to it either."""
    def generate(inputs, cache: bool):
        return backbone.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=cache,
                                 output_scores=True, return_dict_in_generate=True)

    handle = attach(backbone, [(threshold_pruner(backbone), "llm.1", 1.0)], mode="hard")
    try:
        cached, recomputed = (generate(batch, cache) for cache in (True, False))
        alone = [generate(encode(backbone.processor, [s]), True).sequences[0, -4:] for s in tiny_samples]
    finally:
        handle.detach()
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), atol=2e-5, rtol=1e-5)
    assert torch.equal(cached.sequences[:, -4:], torch.stack(alone))


def test_a_threshold_of_zero_keeps_everything_and_reproduces_the_unpruned_logits(backbone, batch):
    kept_all, handle = run(backbone, [(threshold_pruner(backbone, threshold=0.0), "llm.1", 1.0)], batch)
    assert torch.equal(kept_all, last_logits(backbone, batch))
    assert handle.mean_kept(str(handle.stages[0])) == backbone.n_visual_tokens


def test_later_stages_see_the_padding_and_never_count_it(backbone, tiny_samples, batch):
    stages = [(threshold_pruner(backbone, seed=0), "llm.1", 1.0), ("fastv", "llm.2", 4)]
    together, handle = run(backbone, stages, batch)
    first, second = (handle.last_kept[str(st)] for st in handle.stages)
    assert (first == PADDING).any()
    for row_first, row_second in zip(first.tolist(), second.tolist()):
        real = [p for p in row_second if p != PADDING]
        assert len(real) == min(4, sum(p != PADDING for p in row_first))  # FastV ranks padding last
        assert set(real) <= set(row_first)
    alone = torch.cat([run(backbone, stages, encode(backbone.processor, [s]))[0] for s in tiny_samples])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)


def test_two_heads_with_thresholds_compose(backbone, tiny_samples, batch):
    stages = [(threshold_pruner(backbone, seed=0), "llm.1", 1.0), (threshold_pruner(backbone, seed=1), "llm.2", 1.0)]
    together, handle = run(backbone, stages, batch)
    first, second = (handle.last_kept[str(st)] for st in handle.stages)
    for row_first, row_second in zip(first.tolist(), second.tolist()):
        assert {p for p in row_second if p != PADDING} <= {p for p in row_first if p != PADDING}
    alone = torch.cat([run(backbone, stages, encode(backbone.processor, [s]))[0] for s in tiny_samples])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)


def test_counts_are_means_over_every_row_since_attaching(backbone, tiny_samples, batch):
    handle = attach(backbone, [(threshold_pruner(backbone), "llm.1", 1.0)], mode="hard")
    try:
        per_row = []
        for s in tiny_samples:  # one row per pass: every pass adds to the totals
            last_logits(backbone, encode(backbone.processor, [s]))
            per_row += real_counts(next(iter(handle.last_kept.values())))
        counts = token_counts(backbone, 10, handle)
    finally:
        handle.detach()
    stage = str(handle.stages[0])
    assert handle.mean_kept(stage) == pytest.approx(sum(per_row) / len(per_row))
    assert handle.last_counts[stage] == (backbone.n_visual_tokens, per_row[-1])
    assert counts.llm_tokens[1] == 10 + round(sum(per_row) / len(per_row))


@dataclass
class _ProjectorPerRow(Method):
    """Returns a count per row before the LLM, where it is not supported."""

    name = "_projector_per_row"

    def select(self, inputs: SiteInputs) -> Selection:
        b = inputs.tokens.shape[0]
        valid = torch.ones(b, inputs.keep, dtype=torch.bool)
        valid[0, 1:] = False
        return Selection(torch.arange(inputs.keep).expand(b, -1), valid=valid)


def test_a_count_per_row_before_the_llm_is_a_clear_error(backbone, batch):
    handle = attach(backbone, _ProjectorPerRow(), 8, site="projector", mode="hard")
    try:
        with pytest.raises(TokensieveError, match="count that varies per row is supported inside the LLM only"):
            last_logits(backbone, batch)
    finally:
        handle.detach()


def test_a_threshold_outside_zero_to_one_is_refused_when_attaching(backbone):
    with pytest.raises(TokensieveError, match="threshold=1.5 must be in"):
        attach(backbone, [(threshold_pruner(backbone, threshold=1.5), "llm.1", 1.0)])


def test_a_ratio_budget_after_a_count_per_row_is_refused_when_attaching(backbone):
    with pytest.raises(TokensieveError, match="keeps a count per row: give it a token count"):
        attach(backbone, [(threshold_pruner(backbone), "llm.1", 1.0), ("fastv", "llm.2", 0.5)])


@dataclass
class _VisionPerRow(_ProjectorPerRow):
    name = "_vision_per_row"
    count_per_row = True


def test_a_method_with_a_count_per_row_is_refused_before_the_llm_when_attaching(backbone):
    with pytest.raises(TokensieveError, match="supported inside the LLM only"):
        attach(backbone, _VisionPerRow(), 8, site="projector")
