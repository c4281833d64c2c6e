"""The engine's invariants inside CLIP image towers (open_clip and transformers), for every
registered method that can act in a vision tower, on tiny random models on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from tokensieve.attach import attach
from tokensieve.backbones.hf_clip import HFClipViTBackbone
from tokensieve.backbones.open_clip_vit import OpenClipViTBackbone
from tokensieve.backbones.stage_plan import merges_in_blocks
from tokensieve.backbones.vit_adapters import vit_backbone
from tokensieve.backbones.vit_pruning import SIGNALS, ViTPruningSession
from tokensieve.clip.tiny import build_tiny
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.clip_pruning import (
    PruningSettings,
    attach_pruning,
    tokens_per_block,
)
from tokensieve.methods import create_method, list_methods, method_class

METHODS = [name for name in list_methods() if "vision" in method_class(name).stages
           and not method_class(name).trained and set(method_class(name).signals) <= set(SIGNALS)]
# Methods that cut the tokens at their site, and those that merge inside the blocks from it on (ToMe).
IN_BLOCKS = [name for name in METHODS if merges_in_blocks(create_method(name))]
CUT = [name for name in METHODS if name not in IN_BLOCKS]
KINDS = ("open_clip", "hf")
BUDGET = 12


def test_every_vision_method_is_covered():
    assert {"anchor", "random", "tome", "visionzip"} <= set(METHODS)


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    oc_model, _ = build_tiny(seed=0)  # open_clip ViT: 64 patches, 4 blocks
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=2, image_size=32, patch_size=4)).eval()  # 64 patches
    return {"open_clip": OpenClipViTBackbone(oc_model.eval()), "hf": HFClipViTBackbone(hf)}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return {"open_clip": torch.randn(3, 3, 64, 64, generator=g), "hf": torch.randn(3, 3, 32, 32, generator=g)}


@torch.no_grad()
def encode(backbone, pixels):
    return backbone.encode_images(pixels)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_keep_all_reproduces_the_unpruned_output_exactly(backbones, images, kind, name):
    bb, x = backbones[kind], images[kind]
    plain = encode(bb, x)
    handle = attach(bb, name, bb.n_patches, site="vision.1")
    try:
        assert torch.equal(plain, encode(bb, x))
    finally:
        handle.detach()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CUT)
def test_budget_exact_cls_kept_indices_sorted_and_detach_restores(backbones, images, kind, name):
    bb, x = backbones[kind], images[kind]
    model = bb.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = encode(bb, x)
    seen: dict[int, torch.Tensor] = {}
    clean = [bb.blocks[i].register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0])) for i in (1, 2)]
    encode(bb, x)
    unpruned_cls = seen[1][:, 0].clone()
    handle = attach(bb, name, BUDGET, site="vision.1")
    later = [bb.blocks[i].register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0])) for i in (1, 2)]
    try:
        pruned = encode(bb, x)
    finally:
        handle.detach()
        for h in clean + later:
            h.remove()
    stage = str(handle.stages[0])
    assert handle.last_counts == {stage: (bb.n_patches, BUDGET)}
    assert seen[1].shape[1] == seen[2].shape[1] == BUDGET + 1
    assert torch.equal(seen[1][:, 0], unpruned_cls)  # CLS stays first, untouched
    kept = handle.last_kept[stage]
    assert kept.shape == (3, BUDGET) and bool((kept[:, 1:] > kept[:, :-1]).all())
    assert not torch.allclose(plain, pruned)
    assert torch.equal(plain, encode(bb, x))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", IN_BLOCKS)
def test_merging_in_blocks_meets_the_budget_at_the_tower_output_and_detach_restores(backbones, images, kind, name):
    bb, x = backbones[kind], images[kind]
    model = bb.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = encode(bb, x)
    handle = attach(bb, name, BUDGET, site="vision.0")
    seen = []
    out = bb.blocks[-1].register_forward_hook(lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        pruned = encode(bb, x)
    finally:
        out.remove()
        handle.detach()
    stage = str(handle.stages[0])
    assert handle.last_counts == {stage: (bb.n_patches, BUDGET)}
    assert seen[0].shape[1] == BUDGET + 1
    kept = handle.last_kept[stage]  # the patch behind each token, in the merged sequence's order
    assert kept.shape == (3, BUDGET) and all(len(set(row.tolist())) == BUDGET for row in kept)
    assert 0 <= kept.min() and kept.max() < bb.n_patches
    assert not torch.allclose(plain, pruned)
    assert torch.equal(plain, encode(bb, x))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_each_sample_alone(backbones, images, kind, name):
    bb, x = backbones[kind], images[kind]
    # A method merging in blocks reaches a stage's budget by the next stage, halving at most per block.
    stages = [(name, "vision.0", 40), (name, "vision.2", 20)] if name in IN_BLOCKS else \
        [(name, "vision.1", 24), (name, "vision.2", BUDGET)]
    handle = attach(bb, stages)
    try:
        together = encode(bb, x)
        alone = torch.cat([encode(bb, x[i:i + 1]) for i in range(x.shape[0])])
    finally:
        handle.detach()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_signals_match_the_blocks_own_attention(backbones, images, kind):
    """CLS attention and the attention matrix recomputed from q/k equal what the block computes."""
    bb, x = backbones[kind], images[kind]
    captured = {}
    hook = bb.hook_attention_input(0, lambda h: captured.__setitem__("x", h))
    try:
        encode(bb, x)
    finally:
        hook.remove()
    h = captured["x"]
    if kind == "open_clip":  # nn.MultiheadAttention's own weights
        _, reference = bb.blocks[0].attn(h, h, h, need_weights=True, average_attn_weights=True)
    else:  # transformers' eager attention
        eager = copy.deepcopy(bb.model)
        eager.config._attn_implementation = "eager"
        reference = eager(pixel_values=x, output_attentions=True).attentions[0].mean(1)
    session = ViTPruningSession.__new__(ViTPruningSession)  # only its signal code, on the captured input
    session.bb, session._inputs = bb, {0: h}
    signals = session._signals(0)
    torch.testing.assert_close(signals["cls_attention"](), reference[:, 0, 1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(signals["attention"](), reference[:, 1:, 1:], atol=1e-6, rtol=1e-5)


def test_anchor_keeps_its_anchors_and_tokens_per_block(backbones, images):
    bb, x = backbones["open_clip"], images["open_clip"]
    settings = PruningSettings(enable_pruning=True, k_anchors=5, top_m=15)
    handle = attach_pruning(bb, settings)
    try:
        encode(bb, x)
    finally:
        handle.detach()
    assert tokens_per_block(bb, handle) == [65, 21, 21, 21]
    assert [st.site for st in handle.stages] == ["vision.1", "vision.2", "vision.3"]
    assert list(handle.last_counts.values()) == [(64, 20), (20, 20), (20, 20)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(k_anchors=10, top_m=60), (r"k_anchors \+ top_m \+ 1 = 10 \+ 60 \+ 1 = 71 is more than the 65 tokens "
                                    r"\(64 patches \+ CLS\)")),
    (dict(prune_layers=[4]), r"--prune_layers 4: this image tower has blocks 0..3"),
])
def test_bad_settings_for_this_model_are_refused_before_any_work(backbones, kwargs, message):
    bb = backbones["open_clip"]
    with pytest.raises(TokensieveError, match=message):
        attach_pruning(bb, PruningSettings(enable_pruning=True, **kwargs))
    assert not any(m._forward_pre_hooks for m in bb.model.modules())


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=1.5), r"--alpha 1.5 is not in \[0, 1\]"),
    (dict(alpha=-0.1), r"--alpha -0.1 is not in \[0, 1\]"),
    (dict(k_anchors=0), r"--k_anchors 0"),
    (dict(prune_layers=[0, 1]), r"block 0 has no earlier attention"),
    (dict(prune_method="fastv"), r"--prune_method 'fastv' cannot act in a CLIP image tower"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(TokensieveError, match=message):
        PruningSettings(enable_pruning=True, **kwargs).validate()


def test_models_that_are_not_vits_are_refused():
    from tokensieve.optional import import_open_clip

    resnet = import_open_clip().modified_resnet.ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2,
                                                               image_size=32, width=8)
    with pytest.raises(TokensieveError, match="image tower is a ModifiedResNet, not a VisionTransformer"):
        OpenClipViTBackbone(resnet)
    with pytest.raises(TokensieveError, match="Linear is neither an open_clip model"):
        vit_backbone(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="soft"), "mode 'soft' is not available in a CLIP vision tower"),
    (dict(site="vision.0"), "site vision.0 does not exist in this 4-block ViT"),
    (dict(site="vision.4"), "site vision.4 does not exist"),
    (dict(site="projector"), "site projector does not exist"),
])
def test_bad_attach_requests(backbones, kwargs, message):
    bb = backbones["open_clip"]
    with pytest.raises(TokensieveError, match=message):
        attach(bb, "random", 8, **{"site": "vision.1", **kwargs})
    assert not any(m._forward_pre_hooks for m in bb.model.modules())


def test_speed_rows_and_the_ideal_on_a_small_shape():
    from tokensieve.evaluate.clip_speed import ViTShape, ideal_speedup, speed_rows
    from tokensieve.evaluate.flops import vit_flops

    width, patch = 32, 8
    full = vit_flops(width, patch, 4.0, 16, [17, 17, 17], attention_scores=False)
    assert full == 2 * 16 * 3 * 64 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 128) * 51
    assert ideal_speedup(width, patch, 4.0, 16, [17, 17, 17]) == 1.0
    shape = ViTShape(image_size=32, patch_size=8, width=32, layers=3, heads=2, output_dim=16)
    report = speed_rows(shape, [PruningSettings(enable_pruning=True, k_anchors=2, top_m=4, prune_layers=[1])],
                        batch=2, repeats=1)
    row = report["rows"][0]
    assert row["tokens_per_block"] == [17, 7, 7] and row["method"]["name"] == "anchor"
    assert row["ideal_speedup"] == pytest.approx(ideal_speedup(width, patch, 4.0, 16, [17, 7, 7]))
    assert row["latency_ms_full"] > 0 and row["latency_ms_pruned"] > 0


def test_vit_backbone_takes_a_bare_open_clip_tower(backbones):
    bb = vit_backbone(backbones["open_clip"].visual)
    assert (bb.n_patches, bb.depth, bb.geometry, bb.image_size) == (64, 4, (128, 8, 4.0), 64)


def test_anchor_importance_reads_the_blocks_attention_to_the_anchors():
    from tokensieve.method import SiteInputs
    from tokensieve.methods.anchor import Anchor, anchor_attention_importance

    attention = torch.full((1, 4, 4), 0.1)
    attention[0, :, 0] = torch.tensor([0.5, 0.2, 0.7, 0.3])  # token 2 attends most to token 0
    cls = torch.tensor([[0.9, 0.05, 0.03, 0.02]])  # token 0 is the anchor
    assert torch.allclose(anchor_attention_importance(attention, torch.tensor([[0]])), attention[0, :, 0][None])
    keys = torch.randn(1, 4, 8)
    signals = {"cls_attention": lambda: cls, "keys": lambda: keys, "attention": lambda: attention}
    sel = Anchor(k_anchors=1, alpha=1.0).select(SiteInputs(torch.randn(1, 4, 8), 2, "vision.1", [], signals))
    assert sel.indices.tolist() == [[0, 2]]


def test_a_transformers_clip_model_prunes_its_vision_tower():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 4},
                        projection_dim=16)
    bb = vit_backbone(CLIPModel(config).eval())
    x = torch.randn(2, 3, 32, 32)
    plain = encode(bb, x)
    handle = attach_pruning(bb, PruningSettings(enable_pruning=True, k_anchors=4, top_m=8))
    try:
        pruned = encode(bb, x)
    finally:
        handle.detach()
    assert isinstance(bb, HFClipViTBackbone) and pruned.shape == plain.shape == (2, 16)
    assert bb.geometry == (32, 4, 2.0) and bb.image_size == 32
    assert list(handle.last_counts.values()) == [(64, 12), (12, 12)]
    assert torch.equal(plain, encode(bb, x))
