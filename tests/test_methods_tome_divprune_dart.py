"""ToMe, DivPrune and DART on small hand-made and random tensors (no model needed)."""

from __future__ import annotations

import pytest
import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs
from tokensieve.methods import create_method, list_methods
from tokensieve.methods.dart import DART
from tokensieve.methods.divprune import DivPrune, second_smallest
from tokensieve.methods.tome import ToMe

NAMES = ["tome", "divprune"]  # DART reads LLM signals; its generic checks are in its own section
# ToMe's default merges inside the vision blocks (test_block_merging.py); at one site it is its one_site option.
SPECS = {"tome": {"name": "tome", "one_site": True}}


def inputs(tokens: torch.Tensor, keep: int, signals=None) -> SiteInputs:
    return SiteInputs(tokens, keep, "projector", [torch.Generator().manual_seed(0)] * tokens.shape[0],
                      signals or {})


def random_tokens(b: int, n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def test_registered_with_the_contract_attributes():
    assert set(NAMES) <= set(list_methods())
    assert (ToMe.stages, ToMe.default_site, ToMe.signals) == (("vision", "projector"), "vision.0", ("keys",))
    assert (DivPrune.stages, DivPrune.default_site, DivPrune.signals) == (("projector", "llm"), "llm.0", ())
    assert (DART.stages, DART.default_site, DART.signals) == (
        ("llm",), "llm.2", ("prev_layer_keys", "normed_states", "positions"))
    assert create_method("dart").config() == {"name": "dart", "pivot_image_tokens": 4, "pivot_text_tokens": 4,
                                              "exact_budget": False}
    for cls in (ToMe, DivPrune, DART):
        assert "arXiv:" in cls.paper and cls.__doc__


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,keep", [(1, 1), (2, 1), (7, 1), (7, 3), (9, 5), (16, 15), (16, 16), (33, 10)])
def test_exact_budget_sorted_unique(name, n, keep):
    tokens = random_tokens(3, n)
    sel = create_method(SPECS.get(name, name)).select(inputs(tokens, keep))
    assert sel.indices.shape == (3, keep) and sel.indices.dtype == torch.long
    for row in sel.indices:
        assert torch.equal(row, row.unique())  # unique() sorts: sorted and no repeats
        assert 0 <= row.min() and row.max() < n
    if sel.tokens is not None:
        assert sel.tokens.shape == (3, keep, 8)


@pytest.mark.parametrize("name", NAMES)
def test_keep_all_returns_every_token_unchanged(name):
    tokens = random_tokens(2, 10)
    sel = create_method(SPECS.get(name, name)).select(inputs(tokens, 10))
    assert torch.equal(sel.indices, torch.arange(10).expand(2, 10))
    assert sel.tokens is None or torch.equal(sel.tokens, tokens)


@pytest.mark.parametrize("name", NAMES)
def test_budget_outside_the_tokens_is_refused(name):
    with pytest.raises(TokensieveError, match="cannot keep 6 of the 5 tokens"):
        create_method(SPECS.get(name, name)).select(inputs(random_tokens(1, 5), 6))


@pytest.mark.parametrize("name", NAMES)
def test_rows_choose_independently_and_alone_equals_batched(name):
    tokens = random_tokens(3, 24, seed=1)
    method = create_method(SPECS.get(name, name))
    together = method.select(inputs(tokens, 7))
    assert not torch.equal(together.indices[0], together.indices[1])
    for i in range(3):
        alone = method.select(inputs(tokens[i : i + 1], 7))
        assert torch.equal(alone.indices[0], together.indices[i])
        if alone.tokens is not None:
            torch.testing.assert_close(alone.tokens[0], together.tokens[i])


@pytest.mark.parametrize("name", NAMES)
def test_a_row_is_not_steered_by_its_neighbour(name):
    tokens = random_tokens(2, 20, seed=2)
    other = tokens.clone()
    other[1] = random_tokens(1, 20, seed=3)[0]
    method = create_method(SPECS.get(name, name))
    assert torch.equal(method.select(inputs(tokens, 5)).indices[0], method.select(inputs(other, 5)).indices[0])


# ---- ToMe -----------------------------------------------------------------------------------

def test_tome_merging_identical_tokens_keeps_their_value():
    # A = {0, 2}, B = {1, 3}; token 0 duplicates token 1, token 2 matches nothing well.
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]]])
    sel = ToMe(one_site=True).select(inputs(tokens, 3))
    assert sel.indices.tolist() == [[1, 2, 3]]
    torch.testing.assert_close(sel.tokens, tokens[:, 1:])


def test_tome_size_weighted_means_over_several_rounds():
    # A = {0, 2, 4}, B = {1, 3}: 0 and 2 join 1 (direction x), 4 joins 3 (direction y).
    tokens = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 4.0], [0.0, 2.0]]])
    two = ToMe(one_site=True).select(inputs(tokens, 2))
    assert two.indices.tolist() == [[1, 3]]
    torch.testing.assert_close(two.tokens, torch.tensor([[[3.0, 0.0], [0.0, 3.0]]]))
    # 4 merges > |A| = 3 needs a second round: the size-3 and size-2 groups merge by size,
    # which is the plain mean of all five tokens (an unweighted mean would give [1.5, 1.5]).
    one = ToMe(one_site=True).select(inputs(tokens, 1))
    assert one.indices.tolist() == [[3]]
    torch.testing.assert_close(one.tokens, torch.tensor([[[1.8, 1.2]]]))


def test_tome_matches_on_keys_when_given():
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])
    # By content, 0 duplicates 1 exactly; by keys, 2 duplicates 3 and 0 is unlike 1.
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    assert ToMe(one_site=True).select(inputs(tokens, 3)).indices.tolist() == [[1, 2, 3]]
    with_keys = ToMe(one_site=True).select(inputs(tokens, 3, {"keys": lambda: keys}))
    assert with_keys.indices.tolist() == [[0, 1, 3]]
    torch.testing.assert_close(with_keys.tokens[0], torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.05, 1.0]]))


def test_tome_merged_tokens_are_means_of_the_inputs():
    tokens = random_tokens(2, 12, seed=4)
    sel = ToMe(one_site=True).select(inputs(tokens, 4))
    # Every kept slot is a convex combination of the row's tokens: inside its per-feature range.
    assert (sel.tokens >= tokens.amin(1, keepdim=True) - 1e-6).all()
    assert (sel.tokens <= tokens.amax(1, keepdim=True) + 1e-6).all()


# ---- DivPrune -------------------------------------------------------------------------------

def test_divprune_picks_one_token_per_cluster():
    g = torch.Generator().manual_seed(5)
    centres = torch.eye(4)[:3] * 3
    clusters = centres.repeat_interleave(4, 0) + 0.05 * torch.randn(12, 4, generator=g)  # 3 x 4 tokens
    order = torch.randperm(12, generator=g)
    tokens = clusters[order][None]
    cluster_of = (order // 4)
    sel = DivPrune().select(inputs(tokens, 3))
    assert sorted(cluster_of[sel.indices[0]].tolist()) == [0, 1, 2]


def test_divprune_starts_from_the_isolated_token_then_the_farthest():
    tokens = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.9, 0.0, 0.1],  # tight cluster
                            [-1.0, 0.0, 0.0],                                     # isolated, opposite it
                            [0.0, 1.0, 0.0]]])                                    # nearer the cluster
    # Nearest-neighbour distances: 3 -> 1.0, 4 -> 0.90, cluster ~0.005, so 3 comes first; then
    # token 0 (distance 2 from 3), then 4 (distance 1 from both) before any second cluster member.
    assert DivPrune().select(inputs(tokens, 1)).indices.tolist() == [[3]]
    assert DivPrune().select(inputs(tokens, 2)).indices.tolist() == [[0, 3]]
    assert DivPrune().select(inputs(tokens, 3)).indices.tolist() == [[0, 3, 4]]


def test_divprune_never_repeats_a_token_even_among_duplicates():
    tokens = torch.ones(2, 6, 4)
    sel = DivPrune().select(inputs(tokens, 4))
    assert all(len(set(row.tolist())) == 4 for row in sel.indices)


def test_divprune_picks_for_each_row_of_a_batch_what_it_picks_for_the_row_alone():
    tokens = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(2))
    together = DivPrune().select(inputs(tokens, 9)).indices
    alone = torch.cat([DivPrune().select(inputs(row[None], 9)).indices for row in tokens])
    assert torch.equal(together, alone)


def test_divprune_second_smallest_is_topks_second_with_ties_and_odd_row_counts():
    """The first pick's score, computed by pairing rows on a CPU, is torch's topk(2)'s second value."""
    g = torch.Generator().manual_seed(3)
    for rows in range(2, 40):
        for values in (torch.randint(0, 4, (2, rows, 5), generator=g).float(),  # repeats of the smallest
                       torch.randn(1, rows, 7, generator=g)):
            before = values.clone()
            assert torch.equal(second_smallest(values), values.topk(2, dim=-2, largest=False).values[:, 1])
            assert torch.equal(values, before)


# ---- DART -----------------------------------------------------------------------------------

def dart_inputs(keys, states, positions, q_keys, q_states, q_positions, keep, q_valid=None) -> SiteInputs:
    """SiteInputs at ``llm.2`` carrying DART's signals over the image and the text tokens."""
    q_valid = torch.ones(q_keys.shape[:2], dtype=torch.bool) if q_valid is None else q_valid
    return SiteInputs(states, keep, "llm.2", [torch.Generator()] * states.shape[0],
                      {"prev_layer_keys": lambda: keys, "normed_states": lambda: states, "positions": lambda: positions},
                      question_states=lambda: (q_states, q_valid),
                      question_signals={"prev_layer_keys": lambda: q_keys, "normed_states": lambda: q_states,
                                        "positions": lambda: q_positions})


def random_dart_inputs(b: int, n: int, t: int, keep: int, seed: int = 0) -> SiteInputs:
    g = torch.Generator().manual_seed(seed)
    return dart_inputs(torch.randn(b, n, 8, generator=g), torch.randn(b, n, 8, generator=g),
                       (3 + torch.arange(n)).expand(b, n), torch.randn(b, t, 8, generator=g),
                       torch.randn(b, t, 8, generator=g), (3 + n + torch.arange(t)).expand(b, t), keep)


def test_dart_pivots_claim_in_set_order_and_text_pivots_are_not_kept():
    e = torch.eye(3)
    # Image pivot p = e1 (largest key L1 norm) and text pivot q = e2 both like t2 least; then p
    # prefers tA and q prefers tB. Each claims one token (keep 3 = 1 pivot + 2 pivots x 1).
    states = torch.stack([e[0],                      # 0 p, image pivot
                          -e[0] - e[1],              # 1 t2: least like p and q
                          -0.6 * e[0] + 0.8 * e[2],  # 2 tA: next least like p
                          -0.6 * e[1] + 0.8 * e[2],  # 3 tB: next least like q
                          e[0] + e[1] + e[2]])[None]
    keys = torch.tensor([[5.0], [1.0], [1.0], [1.0], [1.0]])[None]
    q_keys, q_states = torch.tensor([[[0.1], [3.0]]]), torch.stack([e[2], e[1]])[None]
    method = DART(pivot_image_tokens=1, pivot_text_tokens=1)

    def kept(start: int) -> list[int]:
        # Python's set of {p's position, q's position} iterates by position modulo 8 here.
        sel = method.select(dart_inputs(keys, states, start + torch.arange(5)[None], q_keys, q_states,
                                        start + 5 + torch.arange(2)[None], 3))
        return sel.indices[0].tolist()

    assert list({1, 7}) == [1, 7] and list({3, 9}) == [9, 3]
    assert kept(1) == [0, 1, 3]  # p (position 1) claims t2 first, q (7) then takes tB
    assert kept(3) == [0, 1, 2]  # q (9) claims t2 first, p (3) then takes tA


def test_dart_keeps_the_reference_count_below_the_budget_unless_exact_budget():
    inputs = random_dart_inputs(2, 40, 6, 15)
    paper = DART().select(inputs)  # each of 8 pivots claims (15 - 4) // 8 = 1: 4 + 8 = 12 kept
    assert paper.indices.shape == (2, 12) and paper.valid is None and DART().kept_count(40, 15) == 12
    exact = DART(exact_budget=True).select(inputs)  # 3 more pivots take one more token each
    assert exact.indices.shape == (2, 15) and exact.valid is None
    for short, full in zip(paper.indices, exact.indices):
        assert torch.equal(short, short.unique()) and torch.equal(full, full.unique())
        assert set(short.tolist()) < set(full.tolist())
    assert DART().select(random_dart_inputs(1, 40, 6, 36)).indices.shape == (1, 36)  # 4 + 8 * 4: the budget


def test_dart_keeping_every_token_keeps_them_all():
    sel = DART().select(random_dart_inputs(2, 12, 5, 12))
    assert torch.equal(sel.indices, torch.arange(12).expand(2, 12)) and sel.valid is None


def test_dart_rows_choose_independently():
    inputs = random_dart_inputs(3, 30, 6, 20, seed=1)
    together = DART().select(inputs).indices
    assert not torch.equal(together[0], together[1])
    for i in range(3):
        alone = dart_inputs(*(inputs.signals[k]()[i : i + 1] for k in ("prev_layer_keys", "normed_states", "positions")),
                            *(inputs.question_signals[k]()[i : i + 1]
                              for k in ("prev_layer_keys", "normed_states", "positions")), 20)
        assert torch.equal(DART().select(alone).indices[0], together[i])


def test_dart_without_text_pivots_needs_no_question():
    inputs = random_dart_inputs(1, 20, 3, 9)
    inputs.question_states, inputs.question_signals = None, {}
    assert DART(pivot_image_tokens=3, pivot_text_tokens=0).select(inputs).indices.shape == (1, 9)


def test_dart_refuses_what_the_reference_cannot_do():
    with pytest.raises(TokensieveError, match="image pivots"):
        DART().select(random_dart_inputs(1, 20, 6, 3))
    with pytest.raises(TokensieveError, match="only 2"):
        DART().select(random_dart_inputs(1, 20, 2, 12))
    with pytest.raises(TokensieveError, match="llm.k with k >= 1"):
        DART().check(64, 16, "llm.0")
    with pytest.raises(TokensieveError, match="llm.k with k >= 1"):
        DART().check(64, 16, "projector")
    with pytest.raises(TokensieveError, match="below that"):
        DART().check(64, 3, "llm.2")
    DART().check(64, 16, "llm.1")
    with pytest.raises(TokensieveError, match="not available"):
        DART().select(inputs(random_tokens(1, 20), 12))


def test_dart_rejects_bad_parameters():
    with pytest.raises(TokensieveError, match="pivot_text_tokens"):
        DART(pivot_text_tokens=-1)
    with pytest.raises(TokensieveError, match="pivot_image_tokens"):
        create_method("dart", pivot_image_tokens=2.5)
    with pytest.raises(TokensieveError, match="at least one pivot"):
        DART(pivot_image_tokens=0, pivot_text_tokens=0)
    with pytest.raises(TokensieveError, match="exact_budget"):
        DART(exact_budget="yes")
