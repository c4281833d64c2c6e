"""ToMe's merge inside transformer blocks (tokensieve.backbones.block_merging) and its schedule.

The released forward itself is matched in test_parity_tome.py (transformers CLIP); here: the same
fixture on an open_clip ViT, one block against a hand-written ToMe block, detaching, the ViT
session's stages and the schedule rules.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from parity_fixtures import assert_close_relative, load_fixture
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from tokensieve.attach import attach
from tokensieve.backbones.block_merging import BlockMerger
from tokensieve.backbones.hf_clip import HFClipViTBackbone
from tokensieve.backbones.open_clip_vit import OpenClipViTBackbone
from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs
from tokensieve.methods import create_method
from tokensieve.methods.tome import (
    ToMe,
    bipartite_matching,
    budget_schedule,
    merge_wavg,
    schedule_leaves,
)
from tokensieve.optional import import_open_clip

VIT, VIT_META = load_fixture("tome_vit")


def open_clip_from_timm(weights: dict[str, torch.Tensor]):
    """The fixture's timm ViT as an open_clip VisionTransformer."""
    oc = import_open_clip()
    cfg = VIT_META["model"]
    visual = oc.transformer.VisionTransformer(
        image_size=cfg["img_size"], patch_size=cfg["patch_size"], width=cfg["embed_dim"], layers=cfg["depth"],
        heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], output_dim=8, act_layer=oc.transformer.QuickGELU,
        norm_layer=partial(oc.transformer.LayerNorm, eps=1e-6)).eval()
    w = {k.removeprefix("weight."): v for k, v in weights.items() if k.startswith("weight.")}
    state = {"conv1.weight": w["patch_embed.proj.weight"], "class_embedding": w["cls_token"].reshape(-1),
             "positional_embedding": w["pos_embed"][0], "ln_pre.weight": w["norm_pre.weight"],
             "ln_pre.bias": w["norm_pre.bias"], "ln_post.weight": w["norm.weight"], "ln_post.bias": w["norm.bias"]}
    pairs = {"norm1": "ln_1", "attn.qkv": None, "attn.proj": "attn.out_proj", "norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(cfg["depth"]):
        for a, b in pairs.items():
            for kind in ("weight", "bias"):
                dst = f"attn.in_proj_{kind}" if b is None else f"{b}.{kind}"
                state[f"transformer.resblocks.{i}.{dst}"] = w[f"blocks.{i}.{a}.{kind}"]
    missing, unexpected = visual.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"proj"}
    return visual


def open_clip_tokens(visual) -> torch.Tensor:
    seen = []
    hook = visual.ln_post.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        visual(VIT["pixels"])
    hook.remove()
    return seen[0]


@pytest.fixture(scope="module")
def visual():
    return open_clip_from_timm(VIT)


def test_open_clip_weights_map_and_the_released_forward_is_reproduced(visual):
    before = open_clip_tokens(visual)
    assert_close_relative(before, VIT["plain"])
    for case in ("r8", "list"):
        budget = VIT_META["cases"][case]["tokens_out"] - 1
        handle = attach(OpenClipViTBackbone(visual), {"name": "tome", "r": VIT_META["cases"][case]["r"]}, budget,
                        site="vision.0")
        out = open_clip_tokens(visual)
        handle.detach()
        assert_close_relative(out, VIT[f"{case}.out"])
    assert torch.equal(open_clip_tokens(visual), before)  # detached: bit for bit


# ---- one block against a hand-written ToMe block --------------------------------------------

def tiny_clip(layers: int = 2, seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                              image_size=24, patch_size=4, hidden_act="quick_gelu", attn_implementation="eager")
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def layers_of(model) -> nn.ModuleList:
    tower = model if hasattr(model, "embeddings") else model.vision_model
    return tower.encoder.layers


def tome_block(layer, x: torch.Tensor, size: torch.Tensor | None, r: int, prop_attn: bool = True):
    """ToMeBlock.forward with ToMeAttention (proportional attention) written out for a CLIP layer."""
    attn = layer.self_attn
    b, t, d = x.shape
    h = layer.layer_norm1(x)
    q, k, v = (p(h).view(b, t, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = q @ k.transpose(-1, -2) * attn.scale
    if size is not None and prop_attn:
        logits = logits + size.log()[:, None, None, :]
    y = x + attn.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
    slot, order = bipartite_matching(k.mean(1), r, class_token=True)
    y, size = merge_wavg(y, size if size is not None else y.new_ones(b, t), slot, order.shape[1])
    return y + layer.mlp(layer.layer_norm2(y)), size


def test_hooks_on_clip_layers_equal_a_hand_written_tome_block():
    model = tiny_clip()
    layers = layers_of(model)
    x = torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, size = tome_block(layers[0], x, None, 9)
        expected, size = tome_block(layers[1], expected, size, 5)
        merger = BlockMerger(layers, {0: 9, 1: 5}, class_token=True)
        handles = merger.install()
        got = layers[1](layers[0](x, None), None)
        for h in handles:
            h.remove()
        plain = layers[1](layers[0](x, None), None)
    assert got.shape == (2, 37 - 14, 16)
    assert_close_relative(got, expected)
    assert torch.equal(merger.sizes, size)
    assert merger.sizes.sum(1).tolist() == [37.0, 37.0]
    assert plain.shape == x.shape


def test_without_proportional_attention_later_blocks_see_no_bias():
    model = tiny_clip()
    layers = layers_of(model)
    x = torch.randn(1, 37, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, size = tome_block(layers[0], x, None, 9)
        expected, _ = tome_block(layers[1], expected, size, 5, prop_attn=False)
        handles = BlockMerger(layers, {0: 9, 1: 5}, class_token=True, prop_attn=False).install()
        got = layers[1](layers[0](x, None), None)
        for h in handles:
            h.remove()
    assert_close_relative(got, expected)


# ---- through attach ----------------------------------------------------------------------------

def pixels(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 24, 24, generator=torch.Generator().manual_seed(3))


def test_detach_and_disabled_give_the_model_back_bit_for_bit():
    model = tiny_clip(layers=4)
    with torch.no_grad():
        before = model(pixel_values=pixels(), output_hidden_states=True)
        handle = attach(HFClipViTBackbone(model), "tome", 12)
        merged = model(pixel_values=pixels(), output_hidden_states=True)
        with handle.disabled():
            off = model(pixel_values=pixels())
        handle.detach()
        after = model(pixel_values=pixels(), output_hidden_states=True)
    assert [h.shape[1] for h in merged.hidden_states] == [37, 31, 25, 19, 13]  # 36 patches, 6 merged per block
    assert torch.equal(off.last_hidden_state, before.last_hidden_state)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, before.hidden_states))


def test_a_stage_merges_up_to_the_next_one_and_reports_the_patches_behind_its_tokens():
    model = tiny_clip(layers=4)
    handle = attach(HFClipViTBackbone(model), [("tome", "vision.1", 20), ("random", "vision.3", 8)])
    with torch.no_grad():
        out = model(pixel_values=pixels(), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [37, 37, 29, 21, 9]  # merged in blocks 1, 2; cut at 3
    tome, rand = (str(st) for st in handle.stages)
    assert handle.last_counts == {tome: (36, 20), rand: (20, 8)}
    kept = handle.last_kept[tome]
    assert kept.shape == (2, 20) and all(len(set(row.tolist())) == 20 for row in kept)
    assert set(handle.last_kept[rand][0].tolist()) <= set(kept[0].tolist())


def test_tome_merges_from_block_0_by_default_and_other_methods_cannot_start_there():
    assert ToMe.default_site == "vision.0"
    model = tiny_clip(layers=2)
    with pytest.raises(TokensieveError, match=r"site vision.0 does not exist .* sites are vision.1 \.\. vision.1"):
        attach(HFClipViTBackbone(model), "random", 8, site="vision.0")


@pytest.mark.parametrize("method,budget,needle", [
    ("tome", 4, (r"tome@vision.0:4 merges in blocks 0..1 \(up to the end of the tower\): tome: 2 blocks merging "
                 "at most half of the tokens each cannot bring 36 tokens down to 4")),
    ({"name": "tome", "r": 8}, 18, "r=8 over 2 blocks leaves 20 of 36 tokens, not the budget of 18; set the budget to 20"),
    ({"name": "tome", "r": [1, 2, 3]}, 30, "r lists 3 blocks but the stage merges in 2"),
])
def test_budgets_the_blocks_cannot_reach_are_refused_before_any_work(method, budget, needle):
    with pytest.raises(TokensieveError, match=needle):
        attach(HFClipViTBackbone(tiny_clip(layers=2)), method, budget)


def test_unknown_blocks_are_refused():
    with pytest.raises(TokensieveError, match="cannot merge tokens inside a Linear"):
        BlockMerger(nn.ModuleList([nn.Linear(2, 2)]), {0: 1}, class_token=True)


# ---- the method's own checks and the one-site option --------------------------------------------

def test_outside_the_tower_only_the_one_site_option_merges():
    with pytest.raises(TokensieveError, match="tome merges inside the vision tower's blocks .* one_site=True"):
        ToMe().check(64, 16, "projector")
    ToMe(one_site=True).check(64, 16, "projector")
    tokens = torch.randn(1, 8, 4)
    site = SiteInputs(tokens, 4, "projector", [torch.Generator()])
    with pytest.raises(TokensieveError, match="asked it to choose at projector at once"):
        ToMe().select(site)
    assert ToMe(one_site=True).select(site).indices.shape == (1, 4)
    with pytest.raises(TokensieveError, match="takes no r"):
        create_method("tome", one_site=True, r=4)
    with pytest.raises(TokensieveError, match="must be a token count per block"):
        create_method("tome", r="8")


@pytest.mark.parametrize("n", [36, 64, 576])
@pytest.mark.parametrize("blocks", [1, 3, 23, 24])
def test_budget_schedules_reach_the_budget_within_tomes_cap(n, blocks):
    for keep in range(1, n + 1, 7):
        if keep * 2 ** blocks < n:  # halving every block is the most ToMe merges
            with pytest.raises(TokensieveError, match="cannot bring"):
                budget_schedule(n, keep, blocks)
            continue
        schedule = budget_schedule(n, keep, blocks)
        assert schedule_leaves(n, schedule) == schedule + [keep]  # reaches it, and no r is cut by the cap
        assert schedule == sorted(schedule, reverse=True)
        q, rem = divmod(n - keep, blocks)
        even = [q + 1] * rem + [q] * (blocks - rem)
        if schedule_leaves(n, even)[:-1] == even:  # the even split fits under the cap: it is the schedule
            assert schedule == even
