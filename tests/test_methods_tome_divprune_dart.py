"""ToMe, DivPrune and DART on small hand-made and random tensors (no model needed)."""

from __future__ import annotations

import pytest
import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs, create_method, list_methods
from tokensieve.methods.dart import DART
from tokensieve.methods.divprune import DivPrune
from tokensieve.methods.tome import ToMe

NAMES = ["tome", "divprune", "dart"]


def inputs(tokens: torch.Tensor, keep: int, signals=None) -> SiteInputs:
    return SiteInputs(tokens, keep, "projector", [torch.Generator().manual_seed(0)] * tokens.shape[0],
                      signals or {})


def random_tokens(b: int, n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def test_registered_with_the_contract_attributes():
    assert set(NAMES) <= set(list_methods())
    assert (ToMe.stages, ToMe.default_site, ToMe.signals) == (("vision", "projector"), "vision.1", ("keys",))
    assert (DivPrune.stages, DivPrune.default_site, DivPrune.signals) == (("projector", "llm"), "projector", ())
    assert (DART.stages, DART.default_site, DART.signals) == (("llm", "projector"), "llm.2", ())
    assert create_method("dart").config() == {"name": "dart", "pivot_count": 8}
    for cls in (ToMe, DivPrune, DART):
        assert "arXiv:" in cls.paper and cls.__doc__


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,keep", [(1, 1), (2, 1), (7, 1), (7, 3), (9, 5), (16, 15), (16, 16), (33, 10)])
def test_exact_budget_sorted_unique(name, n, keep):
    tokens = random_tokens(3, n)
    sel = create_method(name).select(inputs(tokens, keep))
    assert sel.indices.shape == (3, keep) and sel.indices.dtype == torch.long
    for row in sel.indices:
        assert torch.equal(row, row.unique())  # unique() sorts: sorted and no repeats
        assert 0 <= row.min() and row.max() < n
    if sel.tokens is not None:
        assert sel.tokens.shape == (3, keep, 8)


@pytest.mark.parametrize("name", NAMES)
def test_keep_all_returns_every_token_unchanged(name):
    tokens = random_tokens(2, 10)
    sel = create_method(name).select(inputs(tokens, 10))
    assert torch.equal(sel.indices, torch.arange(10).expand(2, 10))
    assert sel.tokens is None or torch.equal(sel.tokens, tokens)


@pytest.mark.parametrize("name", NAMES)
def test_budget_outside_the_tokens_is_refused(name):
    with pytest.raises(TokensieveError, match="cannot keep 6 of the 5 tokens"):
        create_method(name).select(inputs(random_tokens(1, 5), 6))


@pytest.mark.parametrize("name", NAMES)
def test_rows_choose_independently_and_alone_equals_batched(name):
    tokens = random_tokens(3, 24, seed=1)
    method = create_method(name)
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
    method = create_method(name)
    assert torch.equal(method.select(inputs(tokens, 5)).indices[0], method.select(inputs(other, 5)).indices[0])


# ---- ToMe -----------------------------------------------------------------------------------

def test_tome_merging_identical_tokens_keeps_their_value():
    # A = {0, 2}, B = {1, 3}; token 0 duplicates token 1, token 2 matches nothing well.
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]]])
    sel = ToMe().select(inputs(tokens, 3))
    assert sel.indices.tolist() == [[1, 2, 3]]
    torch.testing.assert_close(sel.tokens, tokens[:, 1:])


def test_tome_size_weighted_means_over_several_rounds():
    # A = {0, 2, 4}, B = {1, 3}: 0 and 2 join 1 (direction x), 4 joins 3 (direction y).
    tokens = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 4.0], [0.0, 2.0]]])
    two = ToMe().select(inputs(tokens, 2))
    assert two.indices.tolist() == [[1, 3]]
    torch.testing.assert_close(two.tokens, torch.tensor([[[3.0, 0.0], [0.0, 3.0]]]))
    # 4 merges > |A| = 3 needs a second round: the size-3 and size-2 groups merge by size,
    # which is the plain mean of all five tokens (an unweighted mean would give [1.5, 1.5]).
    one = ToMe().select(inputs(tokens, 1))
    assert one.indices.tolist() == [[3]]
    torch.testing.assert_close(one.tokens, torch.tensor([[[1.8, 1.2]]]))


def test_tome_matches_on_keys_when_given():
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])
    # By content, 0 duplicates 1 exactly; by keys, 2 duplicates 3 and 0 is unlike 1.
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    assert ToMe().select(inputs(tokens, 3)).indices.tolist() == [[1, 2, 3]]
    with_keys = ToMe().select(inputs(tokens, 3, {"keys": lambda: keys}))
    assert with_keys.indices.tolist() == [[0, 1, 3]]
    torch.testing.assert_close(with_keys.tokens[0], torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.05, 1.0]]))


def test_tome_merged_tokens_are_means_of_the_inputs():
    tokens = random_tokens(2, 12, seed=4)
    sel = ToMe().select(inputs(tokens, 4))
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


# ---- DART -----------------------------------------------------------------------------------

def dart_tokens() -> torch.Tensor:
    e = torch.eye(4)
    return torch.stack([10 * e[0],              # 0 pivot
                        e[0],                   # 1 duplicate of pivot 0
                        e[2],                   # 2 unlike both pivots
                        2 * e[1],               # 3 duplicate of pivot 4
                        9 * e[1],               # 4 pivot
                        e[3],                   # 5 unlike both pivots
                        e[0] + e[2]])[None]     # 6 half like pivot 0


def test_dart_keeps_pivots_and_drops_pivot_duplicates_first():
    tokens = dart_tokens()
    method = DART(pivot_count=2)
    assert method.select(inputs(tokens, 4)).indices.tolist() == [[0, 2, 4, 5]]
    assert method.select(inputs(tokens, 5)).indices.tolist() == [[0, 2, 4, 5, 6]]
    six = method.select(inputs(tokens, 6)).indices[0].tolist()
    assert {0, 2, 4, 5, 6} < set(six) and len(set(six) & {1, 3}) == 1


def test_dart_budget_below_pivot_count_keeps_the_strongest_pivots():
    tokens = dart_tokens()
    assert DART(pivot_count=2).select(inputs(tokens, 1)).indices.tolist() == [[0]]
    assert DART(pivot_count=8).select(inputs(tokens, 3)).indices.tolist() == [[0, 3, 4]]


def test_dart_rejects_a_pivot_count_below_one():
    with pytest.raises(TokensieveError, match="pivot_count"):
        DART(pivot_count=0)
    with pytest.raises(TokensieveError, match="pivot_count"):
        create_method("dart", pivot_count=-2)
