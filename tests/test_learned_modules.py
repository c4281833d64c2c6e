"""The learned pruner's trainable modules on small random tensors (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.errors import TokensieveError
from tokensieve.learned import (HiddenStateDiscriminator, LayerPrunerHead, TokenMerger, inference_keep,
                                keep_probability, training_keep_mask)

D_VISION, D_QUESTION, D_INTERNAL = 12, 10, 16


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_merger(variant: str = "simple") -> TokenMerger:
    torch.manual_seed(0)
    return TokenMerger(D_VISION, D_INTERNAL, variant=variant, d_question=D_QUESTION, num_heads=2)


def question_inputs(b: int = 3, t: int = 5):
    question = randn(b, t, D_QUESTION, seed=1)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False  # row 0 has two padding positions
    return question, mask


def merge(merger: TokenMerger, tokens: torch.Tensor, m: int, **kwargs):
    if merger.variant == "question_aware":
        kwargs.setdefault("question", question_inputs(tokens.shape[0])[0])
    return merger(tokens, m, **kwargs)


# ---------------------------------------------------------------- token merger


@pytest.mark.parametrize("variant", ["simple", "question_aware"])
@pytest.mark.parametrize("n,m", [(1, 1), (7, 1), (9, 4), (16, 15), (16, 16)])
def test_merger_shapes_and_sorted_unique_indices(variant, n, m):
    result = merge(make_merger(variant), randn(3, n, D_VISION), m, stochastic=True)
    assert result.tokens.shape == (3, m, D_VISION)
    assert result.indices.shape == (3, m) and result.indices.dtype == torch.long
    assert result.assignment.shape == (3, n, m)
    assert result.logits.shape == (3, n)
    assert result.gate.shape == (3, m)
    assert bool((result.indices[:, 1:] > result.indices[:, :-1]).all())  # strictly ascending = sorted + unique
    assert bool(((result.indices >= 0) & (result.indices < n)).all())


@pytest.mark.parametrize("variant", ["simple", "question_aware"])
def test_assignment_rows_sum_to_one_and_centres_keep_their_own_row(variant):
    tokens = randn(2, 11, D_VISION)
    result = merge(make_merger(variant), tokens, 4, stochastic=True, assign_tau=0.5)
    torch.testing.assert_close(result.assignment.sum(-1), torch.ones(2, 11))
    own_rows = result.assignment.gather(1, result.indices[..., None].expand(2, 4, 4))
    assert torch.equal(own_rows, torch.eye(4).expand(2, 4, 4))
    # Non-centre tokens are spread softly, not one-hot.
    assert bool((result.assignment.max(-1).values < 1).sum() > 0)


def test_centres_are_assignment_weighted_means_of_the_tokens():
    tokens = randn(2, 10, D_VISION)
    result = make_merger()(tokens, 3)
    a = result.assignment
    expected = torch.einsum("bnm,bnd->bmd", a, tokens) / a.sum(1)[..., None]
    torch.testing.assert_close(result.tokens, expected)
    # Merging really mixes in other tokens: centres differ from the plain centre tokens.
    plain = tokens.gather(1, result.indices[..., None].expand(2, 3, D_VISION))
    assert not torch.allclose(result.tokens, plain)


@pytest.mark.parametrize("variant", ["simple", "question_aware"])
def test_deterministic_call_is_repeatable_and_picks_the_top_logits(variant):
    merger = make_merger(variant)
    tokens = randn(4, 20, D_VISION)
    first, second = merge(merger, tokens, 6), merge(merger, tokens, 6)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.tokens, second.tokens)
    top = first.logits.topk(6, dim=1).indices.sort(1).values
    assert torch.equal(first.indices, top)


def test_stochastic_call_follows_the_rng_and_replays_from_a_saved_state():
    merger = make_merger()
    tokens = randn(4, 24, D_VISION)
    state = torch.get_rng_state()
    first = merger(tokens, 6, stochastic=True)
    second = merger(tokens, 6, stochastic=True)
    assert not torch.equal(first.indices, second.indices)
    deterministic = merger(tokens, 6)
    assert not torch.equal(first.indices, deterministic.indices)
    torch.set_rng_state(state)
    replay = merger(tokens, 6, stochastic=True)
    assert torch.equal(replay.indices, first.indices) and torch.equal(replay.tokens, first.tokens)


@pytest.mark.parametrize("stochastic", [False, True])
def test_straight_through_gate_is_one_and_gives_the_scorer_a_gradient(stochastic):
    merger = make_merger()
    tokens = randn(2, 12, D_VISION)
    result = merger(tokens, 5, stochastic=stochastic, gumbel_tau=0.5)
    assert torch.equal(result.gate, torch.ones(2, 5))
    (result.tokens * randn(2, 5, D_VISION, seed=3)).sum().backward()
    for p in merger.scorer.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_diverse_topk_is_top_k_at_weight_zero_and_skips_lookalikes_above_it():
    from tokensieve.ops import diverse_topk, topk_sorted

    scores, features = randn(3, 20), randn(3, 20, 6, seed=2)
    assert torch.equal(diverse_topk(scores, features, 7, 0.0), topk_sorted(scores, 7))
    scores = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0]])
    features = torch.tensor([[[1.0, 0], [1, 0.01], [1, -0.01], [0, 1], [-1, 0]]])  # 0, 1, 2 look alike
    assert diverse_topk(scores, features, 2, 0.0).tolist() == [[0, 1]]
    assert diverse_topk(scores, features, 2, 2.0).tolist() == [[0, 3]]
    assert diverse_topk(scores, features, 3, 2.0).tolist() == [[0, 1, 3]]  # a lookalike beats a poor token


def test_a_diversity_radius_penalises_lookalikes_near_a_pick_only():
    from tokensieve.ops import diverse_topk

    # a 4 x 4 grid: tokens 0 and 15 (opposite corners) and 1 (next to 0) look alike, 5 does not
    features = torch.zeros(1, 16, 2)
    features[0, :, 1] = 1.0
    features[0, [0, 1, 15]] = torch.tensor([1.0, 0.0])
    scores = torch.full((1, 16), -1.0)
    scores[0, [0, 1, 15, 5]] = torch.tensor([3.0, 2.9, 2.8, 1.0])
    assert diverse_topk(scores, features, 2, 5.0).tolist() == [[0, 5]]  # 15 looks like the pick 0
    assert diverse_topk(scores, features, 2, 5.0, radius=1.0).tolist() == [[0, 15]]  # but it is far from it
    assert diverse_topk(scores, features, 3, 5.0, radius=1.0).tolist() == [[0, 5, 15]]  # 1 is next to 0


def test_a_background_pick_penalises_lookalikes_at_any_distance_even_with_a_radius():
    from tokensieve.ops import diverse_topk

    # a 4 x 4 grid: objects 0, 5 and 10 look unlike anything; the rest is alike background,
    # scored near 0, below the row's mean: 3 and 12 (opposite corners) the best of it
    features = torch.zeros(1, 16, 3)
    features[0, :, 1] = 1.0
    features[0, [0, 5, 10]] = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, -1]])
    scores = torch.zeros(1, 16)
    scores[0, [0, 5, 3, 12, 10]] = torch.tensor([3.0, 3.0, 0.1, 0.05, 0.02])
    assert diverse_topk(scores, features, 4, 5.0).tolist() == [[0, 3, 5, 10]]
    # background 12 is far from the background pick 3, but is no new thing: object 10 wins
    assert diverse_topk(scores, features, 4, 5.0, radius=1.0).tolist() == [[0, 3, 5, 10]]


def test_a_diversity_radius_needs_the_square_patch_grid():
    merger = make_merger()
    assert merger(randn(2, 16, D_VISION), 4, diversity=2.0, diversity_radius=1.5).indices.shape == (2, 4)
    with pytest.raises(TokensieveError, match="diversity_radius=1.5 needs .* the 12 tokens on a square patch grid"):
        merger(randn(2, 12, D_VISION), 4, diversity=2.0, diversity_radius=1.5)


def test_the_merger_method_fades_diversity_with_distance_in_its_deterministic_choice_only():
    from tokensieve.method import SiteInputs
    from tokensieve.methods.token_merger import LearnedTokenMerger

    method = LearnedTokenMerger(diversity=2.0, diversity_radius=1.5, module=make_merger())
    off_grid = SiteInputs(randn(2, 12, D_VISION), 4, "projector", generator=list)  # 12 tokens: no square grid
    method.module.train()
    assert method.select(off_grid).indices.shape == (2, 4)  # training draws: content-only penalty
    method.module.eval()
    with pytest.raises(TokensieveError, match="diversity_radius=1.5"):
        method.select(off_grid)


def test_diverse_centres_keep_a_straight_through_gate_for_the_scorer():
    merger = make_merger()
    result = merger(randn(2, 12, D_VISION), 5, stochastic=True, diversity=2.0)
    assert torch.equal(result.gate, torch.ones(2, 5)) and result.indices.shape == (2, 5)
    (result.tokens * randn(2, 5, D_VISION, seed=3)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in merger.scorer.parameters())


def test_a_high_null_logit_drops_instead_of_merging_and_learns():
    torch.manual_seed(0)
    merger = TokenMerger(D_VISION, D_INTERNAL, null_logit=30.0)
    tokens = randn(2, 12, D_VISION)
    result = merger(tokens, 4)
    assert (result.assignment.sum(-1) <= 1 + 1e-6).all()
    torch.testing.assert_close(result.tokens, tokens.gather(1, result.indices[..., None].expand(-1, -1, D_VISION)))
    merger.null_logit.data.fill_(0.0)  # a reachable null: merging happens and the logit gets a gradient
    result = merger(tokens, 4)
    (result.tokens * randn(2, 4, D_VISION, seed=3)).sum().backward()
    assert merger.null_logit.grad is not None and merger.null_logit.grad != 0


def test_all_tokens_as_centres_return_the_tokens_even_at_tiny_assign_temperature():
    merger = make_merger()
    tokens = randn(2, 9, D_VISION)
    for tau in (1.0, 1e-3, 1e-8):
        result = merger(tokens, 9, assign_tau=tau, stochastic=True)
        assert torch.equal(result.indices, torch.arange(9).expand(2, 9))
        assert torch.equal(result.assignment, torch.eye(9).expand(2, 9, 9))
        torch.testing.assert_close(result.tokens, tokens, rtol=0, atol=0)


def test_question_aware_logits_depend_on_the_question():
    merger = make_merger("question_aware")
    tokens = randn(3, 8, D_VISION)
    question, mask = question_inputs()
    base = merger.importance(tokens, question, mask)
    other = merger.importance(tokens, question + randn(*question.shape, seed=5), mask)
    assert not torch.allclose(base, other)
    # No mask means every question token is real.
    full = torch.ones_like(mask)
    torch.testing.assert_close(merger.importance(tokens, question), merger.importance(tokens, question, full))


def test_question_aware_ignores_padded_question_positions():
    merger = make_merger("question_aware")
    tokens = randn(3, 8, D_VISION)
    question, mask = question_inputs()
    base = merger(tokens, 3, question=question, question_mask=mask)
    padded = question.clone()
    padded[0, 3:] = 100.0  # only padding positions change
    same = merger(tokens, 3, question=padded, question_mask=mask)
    torch.testing.assert_close(same.logits, base.logits)
    torch.testing.assert_close(same.tokens, base.tokens)
    # The same change counts when those positions are real.
    unmasked = merger.importance(tokens, padded, torch.ones_like(mask))
    assert not torch.allclose(unmasked[0], merger.importance(tokens, question, torch.ones_like(mask))[0])


@pytest.mark.parametrize("build,call,words", [
    (lambda: TokenMerger(D_VISION, variant="fancy"), None, "unknown token merger variant"),
    (lambda: TokenMerger(D_VISION, variant="question_aware"), None, "needs d_question"),
    (lambda: TokenMerger(D_VISION, 16, variant="question_aware", d_question=4, num_heads=3), None,
     "divisor of d_internal"),
    (make_merger, lambda m: m(randn(2, 5, D_VISION), 0), "n_centres=0"),
    (make_merger, lambda m: m(randn(2, 5, D_VISION), 6), "n_centres=6"),
    (make_merger, lambda m: m(randn(2, 5, D_VISION + 1), 2), "d_vision"),
    (make_merger, lambda m: m(randn(2, 5, D_VISION), 2, gumbel_tau=0.0), "temperatures must be positive"),
    (make_merger, lambda m: m(randn(2, 5, D_VISION), 2, assign_tau=-1.0), "temperatures must be positive"),
    (lambda: make_merger("question_aware"), lambda m: m(randn(2, 5, D_VISION), 2), "needs the question"),
    (lambda: make_merger("question_aware"),
     lambda m: m(randn(2, 5, D_VISION), 2, question=randn(2, 4, D_QUESTION + 1)), "d_question"),
    (lambda: make_merger("question_aware"),
     lambda m: m(randn(2, 5, D_VISION), 2, question=randn(2, 4, D_QUESTION),
                 question_mask=torch.ones(2, 3, dtype=torch.bool)), "question_mask of shape"),
    (lambda: make_merger("question_aware"),
     lambda m: m(randn(2, 5, D_VISION), 2, question=randn(2, 4, D_QUESTION),
                 question_mask=torch.tensor([[True] * 4, [False] * 4])), "no valid question token"),
])
def test_merger_bad_arguments_raise_named_errors(build, call, words):
    with pytest.raises(TokensieveError, match=words):
        module = build()
        call(module)


# ---------------------------------------------------------------- layer pruner head

D_MODEL = 14


def make_head(init_keep_bias: float = 2.0, randomise_last: bool = False) -> LayerPrunerHead:
    torch.manual_seed(0)
    head = LayerPrunerHead(D_MODEL, D_INTERNAL, num_heads=2, d_question=D_QUESTION, init_keep_bias=init_keep_bias)
    if randomise_last:  # the fresh head ignores its input by design; give it a trained-looking last layer
        torch.nn.init.normal_(head.mlp[-1].weight, std=0.5)
    return head


@pytest.mark.parametrize("bias", [2.0, -1.0])
def test_fresh_head_keeps_with_probability_sigmoid_of_the_bias(bias):
    question, mask = question_inputs()
    logits = make_head(bias)(randn(3, 7, D_MODEL), question, mask)
    assert logits.shape == (3, 7, 2)
    torch.testing.assert_close(keep_probability(logits), torch.full((3, 7), 1 / (1 + math.exp(-bias))))


def test_head_defaults_to_the_model_width_for_the_question():
    head = LayerPrunerHead(D_MODEL, D_INTERNAL, num_heads=2)
    assert head(randn(2, 4, D_MODEL), randn(2, 3, D_MODEL)).shape == (2, 4, 2)


def test_training_mask_is_binary_and_trains_every_head_parameter():
    question, mask = question_inputs()
    for randomise_last in (False, True):
        head = make_head(0.0, randomise_last)
        keep = training_keep_mask(head(randn(3, 9, D_MODEL), question, mask), tau=0.7)
        assert keep.shape == (3, 9)
        assert bool(((keep == 0) | (keep == 1)).all())
        (keep * randn(3, 9, seed=4)).sum().backward()
        last = head.mlp[-1]
        assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    # Once the last layer is non-zero, the gradient reaches the cross-attention and projections too.
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_head_ignores_padded_question_positions_but_not_real_ones():
    head = make_head(randomise_last=True)
    visual = randn(3, 6, D_MODEL)
    question, mask = question_inputs()
    base = head(visual, question, mask)
    padded = question.clone()
    padded[0, 3:] = -50.0
    torch.testing.assert_close(head(visual, padded, mask), base)
    assert not torch.allclose(head(visual, question + randn(*question.shape, seed=6), mask), base)


def test_keep_probability_is_the_softmax_keep_column():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])
    torch.testing.assert_close(keep_probability(logits), torch.tensor([[0.75, 0.25]]))


@pytest.mark.parametrize("budget", [1, 4, 10])
def test_inference_keep_with_budget_gives_exactly_the_most_probable_sorted(budget):
    logits = randn(3, 10, 2)
    kept, valid = inference_keep(logits, budget)
    assert kept.shape == (3, budget) and kept.dtype == torch.long and valid is None
    assert bool((kept[:, 1:] > kept[:, :-1]).all())
    p = keep_probability(logits)
    for row, k in zip(p, kept):
        dropped = row[~torch.isin(torch.arange(10), k)]
        assert dropped.numel() == 0 or row[k].min() >= dropped.max()


def logits_of(p_keep: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(p_keep), torch.logit(p_keep)], -1)


P_KEEP = torch.tensor([[0.9, 0.2, 0.7, 0.5, 0.6],   # strictly above 0.5: tokens 0, 2, 4
                       [0.1, 0.4, 0.3, 0.2, 0.0],   # nothing above: keep the best one (1)
                       [0.8, 0.9, 0.6, 0.7, 0.95]])  # all above, capped by the budget


def kept_rows(kept: torch.Tensor, valid: torch.Tensor) -> list[list[int]]:
    return [row[ok].tolist() for row, ok in zip(kept, valid)]


def test_inference_keep_threshold_keeps_a_count_per_row_padded_with_the_next_most_probable():
    kept, valid = inference_keep(logits_of(P_KEEP), budget=4, threshold=0.5)
    assert kept_rows(kept, valid) == [[0, 2, 4], [1], [0, 1, 3, 4]]
    assert kept.shape == valid.shape == (3, 4) and valid.dtype == torch.bool
    assert bool((kept[:, 1:] > kept[:, :-1]).all())
    assert kept[0].tolist() == [0, 2, 3, 4]  # the padding of a row is its next most probable token
    assert kept[1].tolist() == [0, 1, 2, 3]  # token 1 (0.4), padded by 2, 3 and 0


def test_inference_keep_threshold_never_keeps_padding_from_an_earlier_stage():
    already = torch.tensor([[True, True, False, True, True]] * 3)  # token 2 only pads its row
    kept, valid = inference_keep(logits_of(P_KEEP), budget=5, threshold=0.5, valid=already)
    assert kept_rows(kept, valid) == [[0, 4], [1], [0, 1, 3, 4]]
    top, none = inference_keep(logits_of(P_KEEP), budget=4, valid=already)
    assert none is None and all(2 not in row for row in top.tolist())


@pytest.mark.parametrize("call,words", [
    (lambda: LayerPrunerHead(D_MODEL, 16, num_heads=5), "divisor of d_internal"),
    (lambda: make_head()(randn(2, 4, D_MODEL + 1), randn(2, 3, D_QUESTION)), "d_model"),
    (lambda: make_head()(randn(2, 4, D_MODEL), randn(2, 3, D_MODEL)), "d_question"),
    (lambda: make_head()(randn(2, 4, D_MODEL), randn(2, 3, D_QUESTION), torch.zeros(2, 3, dtype=torch.bool)),
     "no valid question token"),
    (lambda: training_keep_mask(randn(2, 4, 2), tau=0.0), "tau=0.0"),
    (lambda: keep_probability(randn(2, 4, 3)), r"\(B, N, 2\)"),
    (lambda: inference_keep(randn(2, 4, 2), budget=0), "budget=0"),
    (lambda: inference_keep(randn(2, 4, 2), budget=5), "budget=5"),
    (lambda: inference_keep(randn(2, 4, 2), budget=4, threshold=1.0), "threshold 1.0"),
])
def test_pruner_bad_arguments_raise_named_errors(call, words):
    with pytest.raises(TokensieveError, match=words):
        call()


# ---------------------------------------------------------------- discriminator


def make_disc() -> HiddenStateDiscriminator:
    torch.manual_seed(0)
    return HiddenStateDiscriminator(D_MODEL, n_states=3, d_internal=D_INTERNAL)


def states_and_mask(b: int = 3, length: int = 6):
    states = [randn(b, length, D_MODEL, seed=10 + i) for i in range(3)]
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, 4:] = False
    mask[1, :2] = False
    return states, mask


def test_discriminator_gives_one_logit_per_row():
    states, mask = states_and_mask()
    assert make_disc()(states, mask).shape == (3,)


def test_discriminator_ignores_masked_positions():
    disc = make_disc()
    states, mask = states_and_mask()
    base = disc(states, mask)
    changed = [s.clone() for s in states]
    for s in changed:
        s[~mask] = math.inf
    torch.testing.assert_close(disc(changed, mask), base)
    real = [s.clone() for s in states]
    real[2][1, 3, 0] += 5.0  # one channel of a pooled position of row 1 (a shift of all channels is normalised away)
    out = disc(real, mask)
    assert not torch.isclose(out[1], base[1]) and torch.equal(out[[0, 2]], base[[0, 2]])


def test_reinitialise_redraws_every_parameter():
    disc = make_disc()
    with torch.no_grad():
        for p in disc.parameters():
            p.add_(1.0)  # as if trained
    before = {name: p.detach().clone() for name, p in disc.named_parameters()}
    disc.reinitialise()
    for name, p in disc.named_parameters():
        assert not torch.equal(p, before[name]), name
    assert all(torch.equal(norm.weight, torch.ones(D_MODEL)) for norm in disc.norms)


@pytest.mark.parametrize("call,words", [
    (lambda: HiddenStateDiscriminator(D_MODEL, n_states=0), "n_states=0"),
    (lambda: make_disc()(states_and_mask()[0][:2], states_and_mask()[1]), "built for 3 hidden states, got 2"),
    (lambda: make_disc()([randn(3, 6, D_MODEL + 1)] * 3, states_and_mask()[1]), "match the mask and d_model"),
    (lambda: make_disc()(states_and_mask()[0], torch.ones(3, 6, 1, dtype=torch.bool)), "mask of shape"),
    (lambda: make_disc()(states_and_mask()[0], torch.zeros(3, 6, dtype=torch.bool)), "selects no position"),
])
def test_discriminator_bad_arguments_raise_named_errors(call, words):
    with pytest.raises(TokensieveError, match=words):
        call()
