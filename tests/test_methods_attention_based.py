"""FastV, VisionZip, PruMerge(+) and the anchor rule on small hand-made tensors (no model)."""

from __future__ import annotations

import pytest
import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs
from tokensieve.methods import create_method
from tokensieve.methods.anchor import (
    Anchor,
    anchor_diversity,
    anchor_importance,
    minmax_rows,
)
from tokensieve.methods.fastv import FastV
from tokensieve.methods.prumerge import (
    PruMerge,
    PruMergePlus,
    adaptive_count,
    iqr_outlier_ratio,
    prumerge_keep,
    prumerge_plus_keep,
)
from tokensieve.methods.visionzip import VisionZip, visionzip_split

N, D, DK = 40, 6, 5


def inputs(tokens, keep, site="projector", **signals):
    b = tokens.shape[0]
    return SiteInputs(tokens, keep, site, [torch.Generator().manual_seed(0)] * b,
                      {name: (lambda v=v: v) for name, v in signals.items()})


def random_batch(b=3, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, D, generator=g)
    cls = torch.rand(b, n, generator=g).softmax(1)
    text = torch.rand(b, n, generator=g).softmax(1)
    keys = torch.randn(b, n, DK, generator=g)
    return tokens, dict(cls_attention=cls, text_attention=text, keys=keys)


METHODS = [FastV(), VisionZip(), Anchor()]  # PruMerge(+) adds a token of its own: its own tests below
IDS = [m.name for m in METHODS]


def check_selection(sel, b, keep, n=N, d=D):
    idx = sel.indices
    assert idx.dtype == torch.long and idx.shape == (b, keep)
    assert bool((idx >= 0).all()) and bool((idx < n).all())
    if keep > 1:
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be sorted and unique"
    if sel.tokens is not None:
        assert sel.tokens.shape == (b, keep, d)


# --- contract over all five methods -------------------------------------------------------
@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("keep", [10, 17, 33, N - 1])
def test_budget_exact_sorted_unique(method, keep):
    tokens, sig = random_batch()
    sel = method.select(inputs(tokens, keep, **sig))
    check_selection(sel, 3, keep)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_keep_all_keeps_everything_unchanged(method):
    tokens, sig = random_batch()
    sel = method.select(inputs(tokens, N, **sig))
    assert torch.equal(sel.indices, torch.arange(N).expand(3, N))
    assert sel.tokens is None or torch.equal(sel.tokens, tokens)


@pytest.mark.parametrize("method", [FastV(), VisionZip(), Anchor(k_anchors=1)],
                         ids=IDS)
def test_keep_one(method):
    tokens, sig = random_batch()
    sel = method.select(inputs(tokens, 1, **sig))
    check_selection(sel, 3, 1)
    if method.name in ("fastv",):
        assert torch.equal(sel.indices[:, 0], sig["text_attention"].argmax(1))
    else:  # the single token is the CLS-attention maximum (dominant / outlier / anchor)
        assert torch.equal(sel.indices[:, 0], sig["cls_attention"].argmax(1))


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_row_alone_equals_row_in_batch(method):
    tokens, sig = random_batch(b=4, seed=3)
    keep = 15
    batch = method.select(inputs(tokens, keep, **sig))
    for r in range(4):
        alone = method.select(inputs(tokens[r:r + 1], keep, **{k: v[r:r + 1] for k, v in sig.items()}))
        assert torch.equal(alone.indices[0], batch.indices[r])
        if batch.tokens is not None:
            torch.testing.assert_close(alone.tokens[0], batch.tokens[r])


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_rows_with_different_signals_choose_differently(method):
    tokens, sig = random_batch(b=1, seed=5)
    tokens, keys = tokens.expand(2, -1, -1), sig["keys"].expand(2, -1, -1)
    g = torch.Generator().manual_seed(9)
    attention = torch.rand(2, N, generator=g)  # same content and keys, different attention per row
    sel = method.select(inputs(tokens, 12, cls_attention=attention, text_attention=attention, keys=keys))
    assert not torch.equal(sel.indices[0], sel.indices[1])


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_budget_larger_than_tokens_is_a_clear_error(method):
    tokens, sig = random_batch()
    with pytest.raises(TokensieveError):
        method.select(inputs(tokens, N + 1, **sig))


@pytest.mark.parametrize("name", ["fastv", "visionzip", "prumerge", "prumerge_plus", "anchor"])
def test_registered_and_recreated_from_config(name):
    method = create_method(name)
    assert create_method(method.config()) == method
    assert method.paper and method.default_site and set(method.stages) <= {"vision", "projector", "llm"}


def test_missing_signal_is_a_clear_error():
    tokens, sig = random_batch()
    with pytest.raises(TokensieveError, match="text_attention"):
        FastV().select(inputs(tokens, 5, cls_attention=sig["cls_attention"]))


# --- FastV ----------------------------------------------------------------------------------
def test_fastv_keeps_highest_text_attention_not_cls():
    tokens = torch.randn(2, 8, D)
    text = torch.tensor([[0.1, 0.5, 0.0, 0.2, 0.9, 0.3, 0.05, 0.4],
                         [0.9, 0.1, 0.8, 0.0, 0.2, 0.3, 0.7, 0.1]])
    sel = FastV().select(inputs(tokens, 3, text_attention=text, cls_attention=-text))
    assert sel.indices.tolist() == [[1, 4, 7], [0, 2, 6]]
    assert sel.tokens is None
    assert FastV.default_site == "llm.2" and FastV.stages == ("llm",)


# --- VisionZip ------------------------------------------------------------------------------
def test_visionzip_split_matches_paper_budgets():
    assert [visionzip_split(k, 54 / 64) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def _visionzip_case():
    n = 12
    tokens = torch.randn(1, n, D)
    cls = torch.full((1, n), 0.01)
    cls[0, [7, 2, 10]] = torch.tensor([0.5, 0.4, 0.3])
    # remaining (index order): 0 1 3 4 5 6 8 9 11; 2 targets, step 9 // 2 = 4 -> rest[0]=0, rest[4]=5
    e = torch.eye(DK)
    keys = torch.randn(1, n, DK) * 0.01
    keys[0, [0, 1, 3, 4]] += e[0]
    keys[0, [5, 6, 8, 9, 11]] += e[1]
    return tokens, cls, keys


def test_visionzip_contextual_token_is_target_plus_mean_of_the_rest():
    tokens, cls, keys = _visionzip_case()
    sel = VisionZip(dominant_ratio=0.6).select(inputs(tokens, 5, cls_attention=cls, keys=keys))
    assert sel.indices.tolist() == [[0, 2, 5, 7, 10]]
    assert sel.extra is None  # no cls_token signal: every dominant token is a patch
    out = sel.tokens[0]
    for slot, i in ((1, 2), (3, 7), (4, 10)):  # dominant tokens unchanged
        assert torch.equal(out[slot], tokens[0, i])
    torch.testing.assert_close(out[0], tokens[0, 0] + tokens[0, [1, 3, 4]].mean(0))
    torch.testing.assert_close(out[2], tokens[0, 5] + tokens[0, [6, 8, 9, 11]].mean(0))
    # emitted dominant (2, 7, 10) then contextual (0, 5)
    assert sel.indices.gather(1, sel.order).tolist() == [[2, 7, 10, 0, 5]]


def test_visionzip_mean_merge_and_positions_order_are_options():
    tokens, cls, keys = _visionzip_case()
    sel = VisionZip(dominant_ratio=0.6, merge="mean", order="positions").select(
        inputs(tokens, 5, cls_attention=cls, keys=keys))
    assert sel.indices.tolist() == [[0, 2, 5, 7, 10]] and sel.order is None
    torch.testing.assert_close(sel.tokens[0, 0], tokens[0, [0, 1, 3, 4]].mean(0))
    torch.testing.assert_close(sel.tokens[0, 2], tokens[0, [5, 6, 8, 9, 11]].mean(0))


def test_visionzip_emits_cls_first_as_one_of_the_dominant_tokens():
    tokens, cls, keys = _visionzip_case()
    cls_token = torch.randn(1, D)
    sel = VisionZip(dominant_ratio=0.6).select(inputs(tokens, 5, cls_attention=cls, keys=keys, cls_token=cls_token))
    # budget 5 = CLS + 2 dominant patches (7, 2) + 2 contextual; step 10 // 2 = 5 -> rest[0]=0, rest[5]=6
    assert sel.indices.tolist() == [[0, 2, 6, 7]]
    assert sel.extra_first and torch.equal(sel.extra, cls_token[:, None])
    drop = VisionZip(dominant_ratio=0.6, cls="drop").select(
        inputs(tokens, 5, cls_attention=cls, keys=keys, cls_token=cls_token))
    assert drop.extra is None and drop.indices.tolist() == [[0, 2, 5, 7, 10]]


def test_visionzip_all_dominant_is_top_cls_attention():
    tokens, sig = random_batch()
    sel = VisionZip(dominant_ratio=1.0).select(inputs(tokens, 9, **sig))
    assert torch.equal(sel.indices, sig["cls_attention"].topk(9, 1).indices.sort(1).values)
    assert sel.tokens is None


@pytest.mark.parametrize("kwargs, message", [({"dominant_ratio": 1.5}, "dominant_ratio"),
                                             ({"cls": "prefix"}, "cls"), ({"merge": "sum"}, "merge"),
                                             ({"order": "sorted"}, "order")])
def test_visionzip_bad_options(kwargs, message):
    with pytest.raises(TokensieveError, match=message):
        VisionZip(**kwargs)


# --- PruMerge / PruMerge+ (parity with the released code: tests/test_parity_prumerge.py) -----
def prumerge_inputs(tokens, keep, att, keys):
    return inputs(tokens, keep, last_block_cls_attention=att, last_block_keys=keys)


def _prumerge_case():
    n = 20
    tokens = torch.randn(1, n, D)
    cls = 1 + 0.05 * torch.arange(n, dtype=torch.float32)[None]
    cls[0, [4, 13]] = 50.0
    e = torch.eye(DK)
    keys = e[2].repeat(1, n, 1)
    keys[0, 4], keys[0, 13] = e[0], e[1]
    keys[0, 0], keys[0, 1] = e[0] + 0.1 * e[2], e[0] + 0.2 * e[2]  # nearest to token 4
    keys[0, 2], keys[0, 3] = e[1] + 0.1 * e[2], e[1] + 0.2 * e[2]  # nearest to token 13
    return tokens, cls, keys


def test_prumerge_adaptive_count_is_the_iqr_outliers_pooled_over_the_batch():
    _, cls, _ = _prumerge_case()
    assert iqr_outlier_ratio(cls) == 2 / 20 and adaptive_count(cls) == 2
    assert sorted(prumerge_keep(cls)[0].tolist()) == [4, 13]
    flat = 1 + 0.05 * torch.arange(20, dtype=torch.float32)[None]
    both = torch.cat([cls, flat])  # one threshold for both rows: 2 outliers of 40 -> int(20 * 0.05) = 1 each
    assert adaptive_count(both) == 1 and prumerge_keep(both).shape == (2, 1)


def test_prumerge_keeps_budget_minus_one_adds_neighbours_and_a_summary_of_the_pruned():
    tokens, cls, keys = _prumerge_case()
    sel = PruMerge(merge_neighbours=2).select(prumerge_inputs(tokens, 3, cls, keys))
    assert sel.indices.tolist() == [[4, 13]] and not sel.extra_first
    a, x = cls[0], tokens[0]
    for slot, (i, j, k) in enumerate([(4, 0, 1), (13, 2, 3)]):  # x_i + sum a_j x_j, unnormalised
        torch.testing.assert_close(sel.tokens[0, slot], x[i] + a[j] * x[j] + a[k] * x[k])
    pruned = [i for i in range(20) if i not in (4, 13)]
    torch.testing.assert_close(sel.extra[0, 0], (a[pruned, None] * x[pruned]).sum(0))


def test_prumerge_neighbours_include_kept_tokens_unless_pruned_only():
    tokens, cls, keys = _prumerge_case()
    keys[0, 13] = torch.eye(DK)[0] + 0.05 * torch.eye(DK)[2]  # the kept token 13 is now 4's nearest
    a, x = cls[0], tokens[0]
    paper = PruMerge(merge_neighbours=2).select(prumerge_inputs(tokens, 3, cls, keys))
    torch.testing.assert_close(paper.tokens[0, 0], x[4] + a[13] * x[13] + a[0] * x[0])
    ours = PruMerge(merge_neighbours=2, neighbours_among="pruned").select(prumerge_inputs(tokens, 3, cls, keys))
    torch.testing.assert_close(ours.tokens[0, 0], x[4] + a[0] * x[0] + a[1] * x[1])


def test_prumerge_mean_merge_no_extra_token_and_raster_order_are_options():
    tokens, cls, keys = _prumerge_case()
    sel = PruMerge(merge_neighbours=2, merge="mean", extra_token=False).select(prumerge_inputs(tokens, 2, cls, keys))
    assert sel.indices.tolist() == [[4, 13]] and sel.extra is None
    a, x = cls[0], tokens[0]
    torch.testing.assert_close(sel.tokens[0, 0], (a[4] * x[4] + a[0] * x[0] + a[1] * x[1]) / (a[4] + a[0] + a[1]))
    assert PruMerge(extra_token=False).makes_extra_tokens is False and PruMerge().makes_extra_tokens
    cls[0, 13] = 60.0  # ranked: 13 enters before 4; positions: raster order
    ranked = PruMerge().select(prumerge_inputs(tokens, 3, cls, keys))
    assert ranked.indices.gather(1, ranked.order).tolist() == [[13, 4]]
    assert PruMerge(order="positions").select(prumerge_inputs(tokens, 3, cls, keys)).order is None
    assert PruMerge(merge_neighbours=0).select(prumerge_inputs(tokens, 3, cls, keys)).tokens is None


def _plus_attention():
    """576 tokens on a gentle ramp (no IQR outliers) with 10 spikes, one (38) on the grid."""
    att = torch.linspace(0.0, 0.1, 576)[None]
    spikes = [5, 38, 100, 101, 222, 300, 333, 444, 500, 555]
    att[0, spikes] = 1.0 + 0.01 * torch.arange(10, dtype=torch.float32)
    return att, spikes


def test_prumerge_plus_outliers_then_the_grid_without_them():
    att, spikes = _plus_attention()
    # ratio 10 / 576 -> int(1 / ratio) = 57 -> stride 19: 0, 19, ..., 570 (31 positions) less 38
    grid = [p for p in range(0, 575, 19) if p != 38]
    kept = prumerge_plus_keep(att)[0].tolist()
    assert kept == spikes[::-1] + grid  # outliers by descending attention, then the grid ascending
    tokens = torch.randn(1, 576, D)
    sel = PruMergePlus().select(prumerge_inputs(tokens, 41, att, torch.randn(1, 576, DK)))
    assert sel.indices.gather(1, sel.order)[0].tolist() == kept  # entering in that order
    assert prumerge_plus_keep(att, 40)[0].tolist() == kept  # the paper's count: the same tokens


def test_prumerge_plus_exact_counts_thin_the_grid_or_top_up_by_attention():
    att, spikes = _plus_attention()
    grid = [p for p in range(0, 575, 19) if p != 38]
    assert prumerge_plus_keep(att, 25)[0].tolist() == spikes[::-1] + grid[1::2]  # 15 of 30, evenly spread
    top_up = prumerge_plus_keep(att, 50)[0].tolist()
    chosen = set(spikes) | set(grid)
    assert top_up[:40] == spikes[::-1] + grid
    assert top_up[40:] == [i for i in range(575, -1, -1) if i not in chosen][:10]  # next by attention
    assert prumerge_plus_keep(att, 5)[0].tolist() == spikes[:4:-1]


def test_prumerge_plus_without_outliers():
    att = torch.linspace(0.0, 0.1, 576)[None]
    with pytest.raises(TokensieveError, match="no IQR outliers"):
        prumerge_plus_keep(att)
    # taken as one outlier (the top token) and its stride, int(576 / 3) = 192, then topped up
    assert prumerge_plus_keep(att, 5)[0].tolist() == [575, 0, 192, 384, 574]


def test_prumerge_plus_rows_are_taken_alone():
    att, spikes = _plus_attention()
    both = torch.cat([att, att.flip(1)])
    assert torch.equal(prumerge_plus_keep(both, 30)[1], prumerge_plus_keep(att.flip(1), 30)[0])
    with pytest.raises(TokensieveError, match="differ between rows"):
        fewer = att.clone()
        fewer[0, spikes[:3]] = 0.05  # 7 outliers: stride 27
        prumerge_plus_keep(torch.cat([att, fewer]))


@pytest.mark.parametrize("method", [PruMerge(), PruMergePlus()], ids=["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("keep", [2, 10, 17, 33, N])
def test_prumerge_budget_counts_the_extra_token(method, keep):
    tokens, sig = random_batch(b=4, seed=3)
    att, keys = sig["cls_attention"], sig["keys"]
    sel = method.select(prumerge_inputs(tokens, keep, att, keys))
    idx = sel.indices
    assert idx.shape == (4, keep - 1) and sel.extra.shape == (4, 1, D) and sel.tokens.shape == (4, keep - 1, D)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    for r in range(4):  # a row alone gives what it gives in the batch
        alone = method.select(prumerge_inputs(tokens[r:r + 1], keep, att[r:r + 1], keys[r:r + 1]))
        assert torch.equal(alone.indices[0], idx[r])
        torch.testing.assert_close(alone.tokens[0], sel.tokens[r])
        torch.testing.assert_close(alone.extra[0], sel.extra[r])


@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
def test_prumerge_acts_at_the_projector_on_the_last_block_signals(cls):
    assert cls.stages == ("projector",) and cls.default_site == "projector"
    assert cls.signals == ("last_block_cls_attention", "last_block_keys")
    tokens, sig = random_batch()
    with pytest.raises(TokensieveError, match="at least 2"):
        cls().check(N, 1, "projector")
    with pytest.raises(TokensieveError, match="last_block_cls_attention"):
        cls().select(inputs(tokens, 5, **sig))
    for bad, message in (({"merge_neighbours": -1}, "merge_neighbours"), ({"merge": "max"}, "merge"),
                         ({"neighbours_among": "kept"}, "neighbours_among"), ({"extra_token": "yes"}, "extra_token"),
                         ({"order": "sorted"}, "order")):
        with pytest.raises(TokensieveError, match=message):
            cls(**bad)


# --- anchor rule ----------------------------------------------------------------------------
def test_anchor_picks_top_cls_attention_as_anchors():
    tokens, sig = random_batch()
    sel = Anchor(k_anchors=6).select(inputs(tokens, 6, site="vision.1", **sig))
    assert torch.equal(sel.indices, sig["cls_attention"].topk(6, 1).indices.sort(1).values)
    sel = Anchor(k_anchors=6).select(inputs(tokens, 20, site="vision.1", **sig))
    anchors = sig["cls_attention"].topk(6, 1).indices
    assert all(bool(torch.isin(anchors[r], sel.indices[r]).all()) for r in range(3))


def _anchor_case():
    n = 8
    e = torch.eye(DK)
    keys = 0.5 * e[2 + torch.arange(n) % 3]  # filler: small keys, orthogonal to e0
    keys[0] = 4 * e[0]   # the anchor
    keys[1] = 4 * e[0]   # attends strongly to the anchor, but duplicates it (diversity 0)
    keys[5] = -4 * e[0]  # opposite to the anchor: most diverse, attends to it least
    cls = torch.full((1, n), 0.1)
    cls[0, 0] = 1.0
    return torch.randn(1, n, D), cls, keys[None]


@pytest.mark.parametrize("alpha, expected", [(1.0, 1), (0.0, 5)])
def test_anchor_alpha_follows_importance_or_diversity(alpha, expected):
    tokens, cls, keys = _anchor_case()
    sel = Anchor(k_anchors=1, alpha=alpha).select(inputs(tokens, 2, site="vision.1", cls_attention=cls, keys=keys))
    assert sel.indices.tolist() == [[0, expected]]


def test_anchor_importance_and_diversity_by_hand():
    _, _, keys = _anchor_case()
    anchors = torch.tensor([[0, 3]])
    att = (keys[0] @ keys[0].T / DK ** 0.5).softmax(-1)
    torch.testing.assert_close(anchor_importance(keys, anchors)[0], att[:, [0, 3]].mean(-1))
    unit = keys[0] / keys[0].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(anchor_diversity(keys, anchors)[0], 1 - (unit @ unit[[0, 3]].T).max(-1).values)


def test_minmax_rows_ignores_anchors():
    x = torch.tensor([[5.0, 1.0, 2.0, 3.0]])
    valid = torch.tensor([[False, True, True, True]])
    torch.testing.assert_close(minmax_rows(x, valid)[0, 1:], torch.tensor([0.0, 0.5, 1.0]))
    assert minmax_rows(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)).eq(0).all()


def test_anchor_budget_errors():
    tokens, sig = random_batch()
    with pytest.raises(TokensieveError, match=r"k_anchors \+ top_m \+ 1 > tokens: 10 \+ 50 \+ 1 > 41"):
        Anchor(top_m=50).select(inputs(tokens, N, site="vision.1", **sig))
    with pytest.raises(TokensieveError, match="k_anchors > keep: 10"):
        Anchor().select(inputs(tokens, 5, site="vision.1", **sig))
    with pytest.raises(TokensieveError, match="budget keeps 20"):
        Anchor(top_m=5).select(inputs(tokens, 20, site="vision.1", **sig))
    with pytest.raises(TokensieveError, match="k_anchors must be"):
        Anchor(k_anchors=0).select(inputs(tokens, 5, site="vision.1", **sig))
    sel = Anchor(top_m=10).select(inputs(tokens, 20, site="vision.1", **sig))  # explicit and matching
    check_selection(sel, 3, 20)
