"""FasterVLM's default reproduces the released code (Theia-4869/FasterVLM, LLaVA-1.5 path).

The fixture holds a seeded tiny CLIP tower's feature-layer patch states, the per-head CLS rows
the reference's ``CLIPVisionTower.feature_select`` returned, the feature block's normed input
and q/k weights, and which patches ``encode_images`` kept at the paper's budgets (576 patches),
in a small case and in a case of tied attention.
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import load_fixture
from torch import nn

from tokensieve.method import SiteInputs
from tokensieve.methods import create_method
from tokensieve.methods.fastervlm import FasterVLM
from tokensieve.backbones.attention_signals import layer_cls_attention

TENSORS, META = load_fixture("fastervlm")


def inputs_for(prefix: str, keep: int) -> SiteInputs:
    """Our signal from the reference's per-head rows: the head mean (CLS column already dropped)."""
    tokens, rows = TENSORS[f"{prefix}features"], TENSORS[f"{prefix}head_cls_attention"]
    return SiteInputs(tokens, keep, "projector", [torch.Generator()] * tokens.shape[0],
                      {"cls_attention": lambda: rows.mean(1)})


@pytest.mark.parametrize("keep", [64, 128, 192, 144, 58, 29])
def test_default_keeps_the_released_codes_patches_at_the_paper_budgets(keep):
    sel = FasterVLM().select(inputs_for("", keep))
    assert torch.equal(sel.indices, TENSORS[f"kept_{keep}"])
    assert sel.tokens is None and sel.extra is None  # pruning only, nothing added


@pytest.mark.parametrize("prefix,keep", [("small_", 25), ("tie_", 30)])
def test_small_and_tied_cases_keep_the_same_patches(prefix, keep):
    sel = create_method("fastervlm").select(inputs_for(prefix, keep))
    assert torch.equal(sel.indices, TENSORS[f"{prefix}kept_{keep}"])


def test_the_engines_cls_attention_is_the_references_head_mean():
    """The backbone computes ``cls_attention`` with attention_signals.layer_cls_attention from the feature block's
    normed input and q/k projections; on the fixture's block that is the reference's
    ``attentions[-2][:, :, 0, 1:].mean(1)``, and it keeps the same patches."""
    q, k = nn.Linear(64, 64), nn.Linear(64, 64)
    with torch.no_grad():
        q.weight.copy_(TENSORS["q_weight"]), q.bias.copy_(TENSORS["q_bias"])
        k.weight.copy_(TENSORS["k_weight"]), k.bias.copy_(TENSORS["k_bias"])
        ours = layer_cls_attention(TENSORS["block_input"], q, k(TENSORS["block_input"]), 4, 16 ** -0.5)[:, 1:]
    reference = TENSORS["head_cls_attention"].mean(1)
    assert float((ours - reference).abs().max() / reference.abs().max()) <= 1e-5
    inputs = SiteInputs(TENSORS["features"], 64, "projector", [torch.Generator()] * 2, {"cls_attention": lambda: ours})
    assert torch.equal(FasterVLM().select(inputs).indices, TENSORS["kept_64"])
