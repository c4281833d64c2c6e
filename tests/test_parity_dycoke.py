"""DyCoke's default reproduces the released TTM (KD-TAO/DyCoke, ``dycole_ttm`` in ``llava/model/llava_arch.py``).

The fixture holds seeded video-like frame tokens (LLaVA-OV's 32 x 196 at k = 0.3 and the README's 0.7,
6 / 8 / 12 frames of 196, one case in float16, a tiny 6 x 2x3 geometry at two k) and the tokens the
released function kept, in its output order; and how it treats frame counts we refuse (odd: the last
frame dropped; 2 and 4: an error).
"""

from __future__ import annotations

import math

import pytest
import torch
from parity_fixtures import load_fixture

from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, SiteInputs, VisualUnit
from tokensieve.methods import create_method
from tokensieve.methods.dycoke import DyCoke, dycoke_count

TENSORS, META = load_fixture("dycoke")
CASES = META["cases"]
RAN = [name for name, case in CASES.items() if "raises" not in case and case["frames"] % 2 == 0]


def video(name: str, keep: int | None = None, **options):
    """DyCoke's selection with ``options`` on case ``name``'s video at llm.0, keeping ``keep``
    (default: the reference's count at the case's k)."""
    case = CASES[name]
    f, p = case["frames"], case["per_frame"]
    side = math.isqrt(p)
    rows, cols = (side, side) if side * side == p else (2, p // 2)
    tokens = TENSORS[case["tokens"]][None]
    unit = VisualUnit("video", f, rows, cols, 0, torch.arange(f * p))
    keep = dycoke_count(f, p, case["k"]) if keep is None else keep
    inputs = SiteInputs(tokens, keep, "llm.0", [torch.Generator()], units=[[unit]])
    return create_method("dycoke", **options).select(inputs)


@pytest.mark.parametrize("name", RAN)
def test_default_keeps_the_references_tokens_in_its_order(name):
    sel = video(name)
    assert torch.equal(sel.indices[0], TENSORS[f"{name}.kept"])
    assert torch.equal(sel.indices[0][sel.order[0]], TENSORS[f"{name}.order"])  # the order the LLM receives
    per_frame = torch.bincount(sel.indices[0] // CASES[name]["per_frame"], minlength=CASES[name]["frames"])
    assert torch.equal(per_frame, TENSORS[f"{name}.per_frame"])
    assert sel.tokens is None and sel.extra is None


@pytest.mark.parametrize("name", RAN)
def test_the_references_count_is_its_budget(name):
    case = CASES[name]
    assert dycoke_count(case["frames"], case["per_frame"], case["k"]) == case["kept"]


def test_the_paper_configuration_is_the_default():
    assert DyCoke() == DyCoke(order="similarity") and DyCoke.default_site == "llm.0"
    assert CASES["f32_p196_k03"]["kept"] == dycoke_count(32, 196) == 4915
    assert "dycoke_k=0.3" in META["configuration"]


def test_positions_order_keeps_the_same_tokens_in_grid_order():
    sel = video("f12_p196_k03", order="positions")
    assert sel.order is None and torch.equal(sel.indices[0], TENSORS["f12_p196_k03.kept"])


def test_a_budget_between_two_ks_gives_the_first_cut_frames_one_more():
    """6 frames of 6: the cut frames are 1, 2, 3 and 5; 26 tokens leave 14 for them: 4, 4, 3, 3. Frames 1 and 2
    keep what the reference keeps at k = 0.3 (4 each), frames 3 and 5 what it keeps at k = 0.5 (3 each)."""
    sel = video("f6_p6_k03", keep=26)
    ours = sel.indices[0]
    at = {k: TENSORS[f"f6_p6_k0{k}.kept"] for k in (3, 5)}
    for frame, k in ((0, 3), (1, 3), (2, 3), (3, 5), (4, 3), (5, 5)):
        mine, theirs = (x[x // 6 == frame] for x in (ours, at[k]))
        assert torch.equal(mine, theirs), frame
    assert len(ours) == 26


def test_keep_all_keeps_every_token():
    sel = video("f8_p196_k03", keep=8 * 196)
    assert torch.equal(sel.indices[0], torch.arange(8 * 196))


def test_a_ratio_budget_is_met_exactly():
    keep = Budget.parse(0.6).resolve(12 * 196)
    sel = video("f12_p196_k03", keep=keep)
    assert sel.indices.shape == (1, keep)


@pytest.mark.parametrize("name,words", [
    ("f9_p16_k03", "a video of 9 frames .*drops an odd video's last frame"),
    ("f5_p16_k03", "a video of 5 frames"),
    ("f4_p16_k03", "a video of 4 frames .*below 5 frames the released code fails"),
    ("f2_p16_k03", "a video of 2 frames"),
])
def test_frame_counts_the_reference_mishandles_are_refused_in_one_line(name, words):
    case = CASES[name]
    if case["frames"] % 2:
        assert TENSORS[f"{name}.per_frame"][-1] == 0  # the reference lost the last frame
    else:
        assert "stack expects a non-empty TensorList" in case["raises"]
    unit = VisualUnit("video", case["frames"], 4, 4, 0, torch.arange(case["frames"] * 16))
    inputs = SiteInputs(TENSORS[case["tokens"]][None], 16 * case["frames"] // 2, "llm.0", [torch.Generator()],
                        units=[[unit]])
    with pytest.raises(TokensieveError, match=words) as caught:
        DyCoke().select(inputs)
    assert "\n" not in str(caught.value)


def test_a_budget_below_the_whole_frames_is_refused_in_one_line():
    with pytest.raises(TokensieveError, match=r"budget of 587 tokens is below the 588 of the 3 frames it keeps "
                                              r"whole of this 8 x 196 video \(its default k=0.3 keeps 1273\)"):
        video("f8_p196_k03", keep=587)
    sel = video("f8_p196_k03", keep=588)  # the least: the whole frames alone
    assert torch.equal(torch.bincount(sel.indices[0] // 196, minlength=8), torch.tensor([196, 0, 0, 0, 196, 0, 196, 0]))


@pytest.mark.parametrize("units,words", [
    (None, "no frames here"),
    ([[VisualUnit("image", 1, 4, 4, 0, torch.arange(16))]], "an image; DyCoke prunes videos only"),
    ([[VisualUnit("video", 6, 2, 3, 0, torch.arange(36)), VisualUnit("video", 6, 2, 3, 36, torch.arange(36))]],
     "a row of 2 images or videos"),
])
def test_what_is_not_one_whole_video_is_refused_in_one_line(units, words):
    tokens = torch.randn(1, 72 if units and len(units[0]) == 2 else 16, 8)
    with pytest.raises(TokensieveError, match=words):
        DyCoke().select(SiteInputs(tokens, 8, "llm.0", [torch.Generator()], units=units))


def test_sites_other_than_llm0_and_unknown_orders_are_refused():
    with pytest.raises(TokensieveError, match="before the LLM \\(llm.0\\), not llm.2"):
        DyCoke().check(64, 16, "llm.2")
    with pytest.raises(TokensieveError, match="order must be one of similarity, positions"):
        DyCoke(order="random")
