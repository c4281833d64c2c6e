"""PruMerge and PruMerge+ against the numbers of the authors' released code (42Shawn/LLaVA-PruMerge,
clip_encoder.py token_prune_merge_advanced / _plus), on the seeded fixtures of
tests/fixtures/parity/prumerge*.json: the same kept tokens, in the same order, the same merged
contents and the same extra token, from our pure functions (the paper's adaptive count) and from
the methods' ``select()`` at a budget of that count plus the extra token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parity_fixtures import assert_close_relative, load_fixture
from tokensieve.method import SiteInputs
from tokensieve.methods.prumerge import (PruMerge, PruMergePlus, adaptive_count, iqr_outlier_ratio, plus_stride,
                                         prumerge_keep, prumerge_merge, prumerge_plus_keep, pruned_summary)
from tokensieve.backbones.attention_signals import layer_cls_attention

FIXTURES = {name: load_fixture(name) for name in ("prumerge", "prumerge_plus")}
CASES = [(name, case) for name, (_, meta) in FIXTURES.items() for case in meta["cases"]]
IDS = [f"{name}-{case}" for name, case in CASES]


def case_tensors(name: str, case: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = FIXTURES[name]
    return {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith(case + ".")}, \
        meta["cases"][case]


def test_fixtures_are_the_paper_setting():
    for _, meta in FIXTURES.values():
        assert meta["commit"] == "097c04116a58465e4bcb58cec44a94018a68ff1a"
        assert "if_adaptive=True" in meta["configuration"]
    assert any(spec["if_adaptive"] and spec["batch"] > 1 for spec in FIXTURES["prumerge"][1]["cases"].values())


@pytest.mark.parametrize("name, case", CASES, ids=IDS)
def test_signals_are_the_last_block_full_width_attention_and_keys(name, case):
    """The engine's last_block_cls_attention is attention_signals.layer_cls_attention with one head over the full
    width, scale d**-0.5, on the block's layer-normed input; last_block_keys is k_proj without CLS."""
    t, _ = case_tensors(name, case)
    d = t["features"].shape[-1]
    hidden = torch.cat([t["cls_state"][:, None], t["features"]], 1)
    normed = nn.functional.layer_norm(hidden, (d,), t["ln_weight"], t["ln_bias"], eps=1e-5)
    q_proj, k_proj = nn.Linear(d, d), nn.Linear(d, d)
    with torch.no_grad():
        q_proj.weight.copy_(t["q_weight"]), q_proj.bias.copy_(t["q_bias"])
        k_proj.weight.copy_(t["k_weight"]), k_proj.bias.copy_(t["k_bias"])
        attention = layer_cls_attention(normed, q_proj, k_proj(normed), 1, d ** -0.5)
        keys = k_proj(normed)
    assert_close_relative(attention[:, 1:], t["cls_attention"])
    assert_close_relative(keys, t["k"])


@pytest.mark.parametrize("name, case", CASES, ids=IDS)
def test_pure_functions_reproduce_the_reference(name, case):
    t, spec = case_tensors(name, case)
    att, keys, features = t["cls_attention"], t["k"][:, 1:], t["features"]
    count = None if spec["if_adaptive"] else int(att.shape[1] * spec["reduction_ratio"])
    if name == "prumerge" and spec["if_adaptive"]:
        assert adaptive_count(att) == t["kept"].shape[1]
    kept = (prumerge_keep if name == "prumerge" else prumerge_plus_keep)(att, count)
    assert torch.equal(kept, t["kept"])  # same tokens in the same order
    assert_close_relative(prumerge_merge(features, att, keys, kept), t["output"][:, :-1])
    assert_close_relative(pruned_summary(features, att, kept), t["output"][:, -1:])


@pytest.mark.parametrize("name, case", CASES, ids=IDS)
def test_select_at_the_papers_count_plus_one_reproduces_the_reference(name, case):
    t, _ = case_tensors(name, case)
    att, keys, features = t["cls_attention"], t["k"][:, 1:], t["features"]
    ref_kept, ref_out = t["kept"], t["output"]
    b, k = ref_kept.shape
    method = PruMerge() if name == "prumerge" else PruMergePlus()
    signals = {"last_block_cls_attention": lambda: att, "last_block_keys": lambda: keys}
    inputs = SiteInputs(features, k + 1, "projector", [torch.Generator().manual_seed(0)] * b, signals)
    sel = method.select(inputs)
    assert sel.indices.shape == (b, k) and not sel.extra_first
    assert torch.equal(sel.indices, ref_kept.sort(1).values)  # identical kept sets
    assert torch.equal(sel.indices.gather(1, sel.order), ref_kept)  # entering in the reference's order
    emitted = torch.cat([sel.tokens.gather(1, sel.order[..., None].expand_as(sel.tokens)), sel.extra], 1)
    assert_close_relative(emitted, ref_out)


def test_prumerge_plus_fixtures_have_outliers_on_the_grid():
    """So the reference's filtering of grid positions already kept is exercised."""
    for case in FIXTURES["prumerge_plus"][1]["cases"]:
        t, _ = case_tensors("prumerge_plus", case)
        att = t["cls_attention"]
        outliers = t["kept"][0, :adaptive_count(att)]
        grid = torch.arange(0, att.shape[1] - 1, plus_stride(iqr_outlier_ratio(att)))
        assert bool(torch.isin(grid, outliers).any())
