"""FastV, VisionZip, PruMerge(+) and the anchor rule on small hand-made tensors (no model)."""

from __future__ import annotations

import pytest
import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs, create_method
from tokensieve.methods.anchor import Anchor, anchor_diversity, anchor_importance, minmax_rows
from tokensieve.methods.fastv import FastV
from tokensieve.methods.prumerge import PruMerge, PruMergePlus, iqr_outliers
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


METHODS = [FastV(), VisionZip(), PruMerge(), PruMergePlus(), Anchor()]
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


@pytest.mark.parametrize("method", [FastV(), VisionZip(), PruMerge(), PruMergePlus(), Anchor(k_anchors=1)],
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


# --- PruMerge / PruMerge+ -------------------------------------------------------------------
def _prumerge_case():
    n = 20
    tokens = torch.randn(1, n, D)
    cls = 1 + 0.05 * torch.arange(n, dtype=torch.float32)[None]
    cls[0, [4, 13]] = 50.0
    e = torch.eye(DK)
    keys = e[2].repeat(1, n, 1)
    keys[0, 4], keys[0, 13] = e[0], e[1]
    keys[0, 0], keys[0, 1] = e[0] + 0.1 * e[2], e[0] + 0.2 * e[2]  # nearest pruned to token 4
    keys[0, 2], keys[0, 3] = e[1] + 0.1 * e[2], e[1] + 0.2 * e[2]  # nearest pruned to token 13
    return tokens, cls, keys


def test_iqr_outliers_are_the_spikes():
    _, cls, _ = _prumerge_case()
    assert iqr_outliers(cls)[0].nonzero().flatten().tolist() == [4, 13]


def test_prumerge_keeps_outliers_and_merges_neighbours_weighted_by_attention():
    tokens, cls, keys = _prumerge_case()
    sel = PruMerge(merge_neighbours=2).select(inputs(tokens, 2, cls_attention=cls, keys=keys))
    assert sel.indices.tolist() == [[4, 13]]
    a, x = cls[0], tokens[0]
    for slot, (i, j, k) in enumerate([(4, 0, 1), (13, 2, 3)]):
        expected = (a[i] * x[i] + a[j] * x[j] + a[k] * x[k]) / (a[i] + a[j] + a[k])
        torch.testing.assert_close(sel.tokens[0, slot], expected)


def test_prumerge_fills_the_budget_by_cls_attention_after_outliers():
    tokens, cls, keys = _prumerge_case()
    sel = PruMerge().select(inputs(tokens, 4, cls_attention=cls, keys=keys))
    assert sel.indices.tolist() == [[4, 13, 18, 19]]  # outliers, then the next by CLS attention


def test_prumerge_without_neighbours_leaves_contents():
    tokens, cls, keys = _prumerge_case()
    assert PruMerge(merge_neighbours=0).select(inputs(tokens, 3, cls_attention=cls, keys=keys)).tokens is None
    with pytest.raises(TokensieveError, match="merge_neighbours"):
        PruMerge(merge_neighbours=-1).select(inputs(tokens, 3, cls_attention=cls, keys=keys))


def test_prumerge_plus_outliers_plus_uniform_samples():
    tokens, cls, keys = _prumerge_case()
    # keep 8: round(0.25 * 8) = 2 uniform, 6 by attention: 4, 13, 19, 18, 17, 16
    sel = PruMergePlus().select(inputs(tokens, 8, cls_attention=cls, keys=keys))
    rest = [i for i in range(20) if i not in (4, 13, 16, 17, 18, 19)]  # 14 tokens
    uniform = [rest[int((j + 0.5) * 14 / 2)] for j in range(2)]  # rest[3], rest[10]
    assert sel.indices[0].tolist() == sorted([4, 13, 16, 17, 18, 19, *uniform])
    assert uniform == [3, 11]


def test_prumerge_plus_uniform_samples_are_spread():
    tokens = torch.randn(1, 16, D)
    cls, keys = torch.rand(1, 16), torch.randn(1, 16, DK)
    sel = PruMergePlus(uniform_share=1.0).select(inputs(tokens, 4, cls_attention=cls, keys=keys))
    assert sel.indices.tolist() == [[2, 6, 10, 14]]
    with pytest.raises(TokensieveError, match="uniform_share"):
        PruMergePlus(uniform_share=2.0).select(inputs(tokens, 4, cls_attention=cls, keys=keys))


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
