"""HiRED's default reproduces the released code (hasanar1f/HiRED, LLaVA-NeXT path).

The fixture holds per-crop CLS attention rows (from their ViT_Attn_Hook on seeded q/k layers in a
tiny geometry of 16 patches per crop, and given rows in LLaVA-NeXT-7B's geometry of 576), the masks
their ``HiRED_token_selection`` chose at several budget rates and alphas, and which crop patches their
``pack_HiRED_image_features`` let through, in order.
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import load_fixture
from torch import nn

from tokensieve.backbones.anyres_layout import anyres_layout
from tokensieve.backbones.attention_signals import layer_cls_attention
from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs
from tokensieve.methods import create_method
from tokensieve.methods.hired import hired_masks

# isort: split
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
)

TENSORS, META = load_fixture("hired")
CASES = META["cases"]
GEOMETRY = {"small": ([[28, 56], [56, 28], [56, 56]], 28, 4),  # pinpoints, crop pixels, patches per side
            "paper": ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336, 24),
            "tie": ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336, 24)}


def rows(geometry: str, block: int) -> torch.Tensor:
    """``(crops, P)`` our signal from the reference's rows: the head mean (they sum; the order is the same)."""
    if geometry == "small":
        return TENSORS[f"small.head_cls_attention_{block}"].mean(1)
    return TENSORS[f"{geometry}.cls_attention_{block}"]


def images(case: str):
    """Per image of ``case``: its size, budget, reference masks ``(n, P)``, its crop rows at the feature block
    and first block ``(n, P)``, and the crop patches the reference's packing let through."""
    spec = CASES[case]
    masks = TENSORS[f"{case}.masks"].split(spec["num_patches"])
    feature, first = (rows(spec["geometry"], b).split(spec["num_patches"]) for b in (1, 0))
    packed = TENSORS[f"{case}.packed_sources"].split(spec["kept_per_image"])
    return list(zip(spec["image_sizes"], spec["budget_per_image"], masks, feature, first, packed))


def our_run(case: str, size, keep: int, feature: torch.Tensor, first: torch.Tensor, **options):
    """The crop patches (``c * P + p``) our method keeps at ``llm.0`` on the image's packed run, in run order."""
    pinpoints, crop, grid = GEOMETRY[CASES[case]["geometry"]]
    layout = anyres_layout(size, pinpoints, crop, grid)
    source = layout.source[layout.candidates]
    tokens = torch.randn(1, len(source), 8)
    signals = {"crop_cls_attention": lambda: feature[None], "first_block_crop_cls_attention": lambda: first[None],
               "anyres_source": lambda: source[None]}
    method = create_method("hired", alpha=CASES[case]["alpha"], **options)
    sel = method.select(SiteInputs(tokens, keep, "llm.0", [torch.Generator()], signals))
    return source[sel.indices[0][sel.valid[0]]], layout


@pytest.mark.parametrize("case", list(CASES))
def test_each_crop_keeps_the_patches_the_reference_chose(case):
    for size, keep, reference, feature, first, _ in images(case):
        ours = hired_masks(feature, first[0], keep, CASES[case]["alpha"])
        assert torch.equal(ours, reference), (case, size)


def grid_sides(case: str, size) -> tuple[int, int]:
    pinpoints, crop, _ = GEOMETRY[CASES[case]["geometry"]]
    return tuple(get_anyres_image_grid_shape(size, pinpoints, crop))


@pytest.mark.parametrize("case", list(CASES))
def test_on_a_square_crop_grid_the_llm_receives_the_references_tokens(case):
    """Images cut into n x n crops: the same crop patches reach the LLM, in the same order (newlines dropped,
    patches chosen in letterbox padding lost, as theirs)."""
    for size, keep, _, feature, first, reference in images(case):
        n_h, n_w = grid_sides(case, size)
        if n_h != n_w:
            continue
        ours, _ = our_run(case, size, keep, feature, first)
        assert torch.equal(ours, reference), (case, size)
        assert len(ours) <= keep


@pytest.mark.parametrize("case", list(CASES))
def test_on_other_grids_ours_packs_as_transformers_and_theirs_transposes(case):
    """A named difference: the reference's packing views an n_h x n_w crop grid as n_w x n_h (it unpacks
    get_anyres_image_grid_shape's (height, width) as (width, height)), then unpads that canvas, so other crop
    patches reach the LLM. Ours packs as the model does (transformers 5.x) and keeps every chosen patch its
    canvas holds; on an uncut canvas that includes every patch the reference lets through."""
    for size, keep, mask, feature, first, reference in images(case):
        n_h, n_w = grid_sides(case, size)
        if n_h == n_w:
            continue
        ours, layout = our_run(case, size, keep, feature, first)
        assert not torch.equal(ours, reference), (case, size)
        in_run = torch.zeros(mask.numel(), dtype=torch.bool)
        in_run[layout.source[layout.candidates]] = True
        assert len(ours) == int((mask.flatten() & in_run).sum())
        if bool(in_run.all()):
            assert set(reference.tolist()) < set(ours.tolist()), (case, size)


def test_the_rounding_and_padding_of_the_reference_keep_fewer_than_the_budget():
    fewer = [(case, size) for case in CASES for size, keep, *_, reference in images(case) if len(reference) < keep]
    assert fewer  # the reference's own counts: its shares round down and its padding loses chosen patches


def test_the_engines_crop_rows_are_the_references():
    """The adapter computes each crop's CLS row with attention_signals.layer_cls_attention from the block's
    normed input and q/k projections (16 heads here, as the reference hard-codes): the reference's
    ViT_Attn_Hook rows over 16 (it sums the heads), and the same masks."""
    ours = []
    for block in (0, 1):
        q, k = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            for lin, name in ((q, "q"), (k, "k")):
                lin.weight.copy_(TENSORS[f"small.{name}_weight_{block}"])
                lin.bias.copy_(TENSORS[f"small.{name}_bias_{block}"])
            hidden = TENSORS[f"small.block_input_{block}"]
            ours.append(layer_cls_attention(hidden, q, k(hidden), 16, 4 ** -0.5)[:, 1:])
        reference = TENSORS[f"small.head_cls_attention_{block}"].sum(1) / 16
        assert float((ours[-1] - reference).abs().max() / reference.abs().max()) <= 1e-5
    case = "small_r20_a50"
    nums = CASES[case]["num_patches"]
    for (size, keep, mask, *_), feature, first in zip(images(case), ours[1].split(nums), ours[0].split(nums)):
        assert torch.equal(hired_masks(feature, first[0], keep, 0.5), mask), size


def test_a_budget_below_one_token_per_part_is_refused_in_one_line():
    case = "paper_r20_a50"
    size, _, _, feature, first, _ = images(case)[0]
    with pytest.raises(TokensieveError, match="smaller than the image's 5 parts") as err:
        our_run(case, size, 4, feature, first)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("options", [{"alpha": 1.0}, {"alpha": -0.1}, {"newlines": "follow"}])
def test_bad_options_are_refused_in_one_line(options):
    with pytest.raises(TokensieveError) as err:
        create_method("hired", **options)
    assert "\n" not in str(err.value)
