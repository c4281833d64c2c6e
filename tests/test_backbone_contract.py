"""The contract every backbone keeps: the one signals check at attach (before any forward pass),
and the one CLS-attention implementation, on tiny random models on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from tokensieve.attach import attach
from tokensieve.backbones.attention_signals import (
    cls_attention,
    layer_cls_attention,
    split_heads,
)
from tokensieve.backbones.base import Site
from tokensieve.backbones.hf_clip import HFClipViTBackbone
from tokensieve.backbones.llava_signals import llava_signals_at
from tokensieve.backbones.vit_pruning import SIGNALS, vit_signals_at
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs


@dataclass
class _NeedsText(Method):
    """A vision method that asks for the LLM's text attention, which no vision site has."""

    name = "needs_text"
    stages = ("vision", "projector")
    signals = ("text_attention",)

    def select(self, inputs: SiteInputs) -> Selection:
        raise AssertionError("a refused stage must never run")


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return HFClipViTBackbone(CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=32, patch_size=4)).eval())


def test_a_vit_refuses_a_missing_signal_at_attach_with_the_shared_message(vit):
    before = _hooks(vit.model)
    message = (r"needs_text@vision.1:8: needs_text needs text_attention, which vision.1 does not provide "
               r"\(it provides: attention, cls_attention, keys\)")
    with pytest.raises(TokensieveError, match=message):
        attach(vit, _NeedsText(), 8, site="vision.1")
    assert _hooks(vit.model) == before


def test_llava_refuses_a_missing_signal_at_attach_with_the_same_message(backbone):
    before = _hooks(backbone.model)
    with pytest.raises(TokensieveError, match=r"needs text_attention, which projector does not provide"):
        attach(backbone, _NeedsText(), 8, site="projector")
    assert _hooks(backbone.model) == before


@pytest.mark.parametrize("later", [("visionzip", "vision.2", 20), ("fastervlm", "projector", 20),
                                   ("prumerge", "projector", 20)], ids=lambda s: f"{s[0]}@{s[1]}")
def test_a_stage_reading_tower_attention_cannot_follow_a_merge_inside_that_block(backbone, later):
    """ToMe at vision.1 merges inside blocks 1..2 of the tiny tower (3 blocks, features from the
    last): block 2's attention ran before its merge, so a later stage reading it is refused at attach."""
    before = _hooks(backbone.model)
    with pytest.raises(TokensieveError, match=r"comes from block \d's attention, which runs before tome@vision.1:40 "
                                              r"merges inside block \d"):
        attach(backbone, [("tome", "vision.1", 40), later])
    assert _hooks(backbone.model) == before


def test_a_vit_refuses_tower_attention_after_a_merge_in_that_block(vit):
    with pytest.raises(TokensieveError, match=r"cls_attention comes from block 1's attention"):
        attach(vit, [("tome", "vision.1", 50), ("fastervlm", "vision.2", 20)])


def test_signal_tables(vit, backbone):
    assert vit_signals_at(vit, Site("vision", 1)) == set(SIGNALS)
    assert vit_signals_at(vit, Site("vision", 0)) == set()  # block 0 has no earlier attention
    assert {"cls_attention", "keys"} <= llava_signals_at(backbone, Site("vision", 1))
    assert "text_attention" in llava_signals_at(backbone, Site("llm", 1))


@pytest.mark.parametrize("heads", [1, 4])
def test_layer_cls_attention_is_the_head_mean_of_the_cls_row(heads):
    """Each head's CLS row ``softmax(q_h k_h^T * scale + bias)``, averaged over the heads."""
    torch.manual_seed(0)
    q_proj, k_proj = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
    hidden, bias = torch.randn(3, 17, 32), torch.randn(3, 17)
    q, k = q_proj(hidden[:, 0]).view(3, heads, -1), k_proj(hidden).view(3, 17, heads, -1)
    expected = (torch.einsum("bhd,bthd->bht", q, k) * 0.3 + bias[:, None]).softmax(-1).mean(1)
    ours = layer_cls_attention(hidden, q_proj, k_proj(hidden), heads, 0.3, bias)
    assert ours.shape == (3, 17)
    torch.testing.assert_close(ours, expected)


def test_cls_attention_upcast_softmaxes_in_float32():
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 1, 8, dtype=torch.bfloat16), torch.randn(2, 2, 5, 8, dtype=torch.bfloat16)
    row = cls_attention(q, k, 0.5, upcast=True)
    expected = ((q @ k.transpose(-1, -2)) * 0.5).float().softmax(-1).mean(1)[:, 0]
    assert row.dtype == torch.float32 and torch.equal(row, expected)
    assert torch.allclose(row.sum(1), torch.ones(2))
    assert split_heads(torch.randn(2, 5, 16), 2).shape == (2, 2, 5, 8)


def test_every_shipped_adapter_keeps_the_protocol(vit, backbone):
    from tokensieve.backbones import Backbone
    from tokensieve.backbones.open_clip_vit import OpenClipViTBackbone
    from tokensieve.clip.tiny import build_tiny

    assert isinstance(vit, Backbone) and isinstance(backbone, Backbone)
    assert isinstance(OpenClipViTBackbone(build_tiny()[0]), Backbone)


def test_attach_refuses_what_is_not_an_adapter(backbone):
    with pytest.raises(TokensieveError, match="a LlavaForConditionalGeneration is not a backbone adapter"):
        attach(backbone.model, "fastv", 8)
