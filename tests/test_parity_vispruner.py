"""VisPruner's default reproduces the released code (Theia-4869/VisPruner, LLaVA-1.5 path).

The fixture holds a seeded tiny CLIP tower's feature-layer patch states, the per-head CLS rows
the reference's ``CLIPVisionTower.feature_select`` returned, and which patches ``encode_images``
kept: the paper's budgets (576 patches; 64/128/192 at important_ratio 0.5, 64 at 0.75), a small
case with a short last round and both ends of the ratio, and tokens with exact duplicates.
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import load_fixture

from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs
from tokensieve.methods import create_method
from tokensieve.methods.vispruner import VisPruner, vispruner_keep, vispruner_split
from tokensieve.ops import topk_sorted

TENSORS, META = load_fixture("vispruner")
CASES = [name for name in TENSORS if "kept_" in name]  # <prefix>kept_<keep>_r<ratio in %>


def case(name: str) -> tuple[SiteInputs, float]:
    """``(inputs, important_ratio)`` of fixture case ``name``; our signal is the head mean of the
    reference's per-head rows (CLS column already dropped)."""
    prefix, rest = name.split("kept_")
    keep, ratio = rest.split("_r")
    tokens, rows = TENSORS[f"{prefix}features"], TENSORS[f"{prefix}head_cls_attention"]
    inputs = SiteInputs(tokens, int(keep), "projector", [torch.Generator()] * tokens.shape[0],
                        {"cls_attention": lambda: rows.mean(1)})
    return inputs, int(ratio) / 100


@pytest.mark.parametrize("name", CASES)
def test_keeps_the_released_codes_patches(name):
    inputs, ratio = case(name)
    method = VisPruner() if ratio == 0.5 else VisPruner(important_ratio=ratio)
    sel = method.select(inputs)
    assert torch.equal(sel.indices, TENSORS[name])
    assert sel.tokens is None and sel.extra is None  # pruning only, nothing added


def test_defaults_are_the_evaluation_scripts():
    assert create_method("vispruner").config() == {"name": "vispruner", "important_ratio": 0.5, "drop_per_round": 8,
                                                   "importance": "cls_attention"}
    assert vispruner_split(64, 0.5) == (32, 32) and vispruner_split(64, 0.75) == (48, 16)


def test_diverse_tokens_are_not_the_next_by_attention():
    """Half the budget is not plain top-k: the duplicate removal changes which patches stay."""
    inputs, _ = case("kept_128_r50")
    assert not torch.equal(topk_sorted(inputs.signal("cls_attention"), 128), TENSORS["kept_128_r50"])


def test_exact_duplicates_do_not_both_stay_among_the_diverse_tokens():
    inputs, _ = case("dup_kept_32_r50")
    att = inputs.signal("cls_attention")
    important = set(att[0].argsort(descending=True)[:16].tolist())
    diverse = [i for i in TENSORS["dup_kept_32_r50"][0].tolist() if i not in important]
    contents = {tuple(inputs.tokens[0, i].tolist()) for i in diverse}
    assert len(contents) == len(diverse)


def test_an_odd_remainder_where_the_released_code_fails_keeps_the_budget():
    assert "IndexError" in META["odd_residual"]  # 58 tokens at 0.5: 547 left after the important ones
    inputs, _ = case("kept_64_r50")
    important, diverse = vispruner_split(58, 0.5)
    kept = vispruner_keep(inputs.tokens, inputs.signal("cls_attention"), important, diverse)
    top = topk_sorted(inputs.signal("cls_attention"), important)
    assert kept.shape == (2, 58) and all(len(set(row.tolist())) == 58 for row in kept)
    assert torch.equal(kept, kept.sort(1).values) and torch.isin(top, kept).all()


@pytest.mark.parametrize("options", [{"important_ratio": 1.5}, {"important_ratio": -0.1}, {"drop_per_round": 0}])
def test_bad_parameters_say_so(options):
    with pytest.raises(TokensieveError, match="vispruner"):
        VisPruner(**options).check(576, 64, "projector")
