"""ToMe against numbers from the released code (facebookresearch/ToMe @ af95e4b).

``tome_step``: one ``bipartite_soft_matching`` + ``merge_wavg`` + ``merge_source`` step, with a
class token on 577 tokens (CLIP-L/336) at r = 1, 176, 288 and 300 (capped to 288), without one,
and with exact score ties. ``tome_vit``: a whole ToMe-patched timm ViT forward (proportional
attention, r = 8 per block and the list [20, 0, 6, 3]); its weights are loaded into a transformers
CLIPVisionModel, where our block hooks must give the same tokens, sizes and sources.
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import assert_close_relative, load_fixture
from transformers import CLIPVisionConfig, CLIPVisionModel

from tokensieve.attach import attach
from tokensieve.backbones.block_merging import BlockMerger
from tokensieve.backbones.hf_clip import HFClipViTBackbone
from tokensieve.methods.tome import ToMe, bipartite_matching, merge_wavg

STEP, STEP_META = load_fixture("tome_step")
VIT, VIT_META = load_fixture("tome_vit")


@pytest.mark.parametrize("case", sorted(STEP_META["cases"]))
def test_one_step_keeps_the_same_tokens_in_the_same_order_with_the_same_contents(case):
    t = {k.split(".", 1)[1]: v for k, v in STEP.items() if k.startswith(case + ".")}
    spec = STEP_META["cases"][case]
    slot, order = bipartite_matching(t["metric"], spec["r"], spec["class_token"])
    for row in range(spec["batch"]):
        assert set(order[row].tolist()) == set(t["order"][row].tolist())  # the surviving tokens
    assert torch.equal(order, t["order"])  # and ToMe's sequence order: [unmerged A, B]
    assert torch.equal(slot, t["slot"])  # every token's group
    merged, size = merge_wavg(t["x"], t["size"], slot, order.shape[1])
    assert_close_relative(merged, t["merged"])
    assert_close_relative(size, t["merged_size"])


def test_the_class_token_sits_in_set_a_so_the_patches_kept_are_the_released_ones():
    # The reviewer's case: stripping CLS first shifts the parity of every patch (overlap 0.39 at 176).
    t = {k.split(".", 1)[1]: v for k, v in STEP.items() if k.startswith("cls_r288.")}
    _, order = bipartite_matching(t["metric"], 288, class_token=True)
    assert (order[:, 0] == 0).all()
    assert (order[:, 1:] % 2 == 1).all()  # r = 288 merges all of A but CLS: the odd tokens survive
    _, stripped = bipartite_matching(t["metric"][:, 1:], 288, class_token=False)
    assert len(set((stripped[0] + 1).tolist()) & set(t["order"][0].tolist())) == 0


def clip_from_timm(weights: dict[str, torch.Tensor], attn: str) -> CLIPVisionModel:
    """The fixture's timm ViT as a transformers CLIPVisionModel (same layout: pre-norm, no patch
    bias, quick-GELU, LayerNorm eps 1e-6)."""
    model_cfg = VIT_META["model"]
    config = CLIPVisionConfig(hidden_size=model_cfg["embed_dim"], num_hidden_layers=model_cfg["depth"],
                              num_attention_heads=model_cfg["num_heads"],
                              intermediate_size=int(model_cfg["embed_dim"] * model_cfg["mlp_ratio"]),
                              image_size=model_cfg["img_size"], patch_size=model_cfg["patch_size"],
                              hidden_act="quick_gelu", layer_norm_eps=1e-6, attn_implementation=attn)
    model = CLIPVisionModel(config).eval()
    w = {k.removeprefix("weight."): v for k, v in weights.items() if k.startswith("weight.")}
    state = {
        "embeddings.patch_embedding.weight": w["patch_embed.proj.weight"],
        "embeddings.class_embedding": w["cls_token"].reshape(-1),
        "embeddings.position_embedding.weight": w["pos_embed"][0],
        "pre_layrnorm.weight": w["norm_pre.weight"], "pre_layrnorm.bias": w["norm_pre.bias"],
        "post_layernorm.weight": w["norm.weight"], "post_layernorm.bias": w["norm.bias"],
    }
    for i in range(model_cfg["depth"]):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        for part, name in zip(w[src + "attn.qkv.weight"].chunk(3), ("q", "k", "v")):
            state[f"{dst}self_attn.{name}_proj.weight"] = part
        for part, name in zip(w[src + "attn.qkv.bias"].chunk(3), ("q", "k", "v")):
            state[f"{dst}self_attn.{name}_proj.bias"] = part
        pairs = {"attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for a, b in pairs.items():
            for kind in ("weight", "bias"):
                state[f"{dst}{b}.{kind}"] = w[f"{src}{a}.{kind}"]
    missing, unexpected = tower(model).load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}
    return model


def tower(model: CLIPVisionModel):
    return model if hasattr(model, "embeddings") else model.vision_model


def tokens_out(model: CLIPVisionModel) -> torch.Tensor:
    """Every token after the final LayerNorm (timm's forward_features), ``(B, T, d)``."""
    with torch.no_grad():
        return tower(model).post_layernorm(model(pixel_values=VIT["pixels"]).last_hidden_state)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def clip(request):
    return clip_from_timm(VIT, request.param)


def test_the_weights_map_onto_transformers_clip(clip):
    assert_close_relative(tokens_out(clip), VIT["plain"])


@pytest.mark.parametrize("case", ["r8", "list"])
def test_block_hooks_reproduce_the_released_forward(clip, case):
    schedule = VIT_META["cases"][case]["schedule"]
    merger = BlockMerger(tower(clip).encoder.layers, dict(enumerate(schedule)), class_token=True)
    handles = merger.install()
    try:
        out = tokens_out(clip)
    finally:
        for h in handles:
            h.remove()
    assert_close_relative(out, VIT[f"{case}.out"])
    assert torch.equal(merger.sizes, VIT[f"{case}.size"])
    assert torch.equal(merger.source, VIT[f"{case}.slot"])
    assert_close_relative(tokens_out(clip), VIT["plain"])  # hooks removed: the model is as before


@pytest.mark.parametrize("case,method", [("r8", "tome"), ("r8", {"name": "tome", "r": 8}),
                                         ("list", {"name": "tome", "r": [20, 0, 6, 3]})])
def test_attached_at_block_0_is_the_released_forward(clip, case, method):
    budget = VIT_META["cases"][case]["tokens_out"] - 1  # patch tokens left after the last block
    handle = attach(HFClipViTBackbone(clip), method, budget, site="vision.0")
    try:
        out = tokens_out(clip)
        stage = str(handle.stages[0])
        assert handle.last_counts[stage] == (64, budget)
        kept = handle.last_kept[stage]
    finally:
        handle.detach()
    assert_close_relative(out, VIT[f"{case}.out"])
    # The patch behind each output token: every source group holds its representative.
    slot = VIT[f"{case}.slot"][:, 1:]  # (B, 64) output token of each patch
    assert torch.equal(slot.gather(1, kept), torch.arange(1, budget + 1).expand(2, -1))


def test_the_default_schedule_of_an_even_budget_is_the_papers_constant_r():
    assert ToMe().merge_schedule(576, 576 - 24 * 8, 24) == [8] * 24
    assert ToMe(r=8).merge_schedule(576, 576 - 24 * 8, 24) == [8] * 24
