"""VisionZip's default reproduces the released code (dvlab-research/VisionZip, LLaVA path).

The fixture holds seeded feature-layer states, the signals our engine gives the method, and what
``CLIPVisionTower_VisionZip.forward`` returned for them (CLS, dominant patches, contextual tokens)
in the paper's configurations (576 patches; 64, 128 and 192 tokens) and two small cases, one with
tied key similarities and a contextual target that nothing joins.
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import assert_close_relative, load_fixture

from tokensieve.method import SiteInputs
from tokensieve.methods.visionzip import VisionZip, visionzip_split

TENSORS, META = load_fixture("visionzip")
CASES = META["cases"]


def case_inputs(case: str, site: str = "projector", with_cls: bool = True) -> SiteInputs:
    spec = CASES[case]
    t = {name: TENSORS[f"{spec['inputs']}.{name}"] for name in ("tokens", "cls_attention", "keys", "cls_token")}
    names = ("cls_attention", "keys", "cls_token") if with_cls else ("cls_attention", "keys")
    b = t["tokens"].shape[0]
    return SiteInputs(t["tokens"], spec["dominant"] + spec["contextual"], site, [torch.Generator()] * b,
                      {name: (lambda v=t[name]: v) for name in names})


def method_for(case: str, **options) -> VisionZip:
    """The default method (the paper's cases); the small cases' split through ``dominant_ratio``."""
    spec = CASES[case]
    keep = spec["dominant"] + spec["contextual"]
    method = VisionZip(**options) if case.startswith("n576") else VisionZip(spec["dominant"] / keep, **options)
    assert visionzip_split(keep, method.dominant_ratio) == (spec["dominant"], spec["contextual"])
    return method


def emitted(sel, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (B, K), tokens (B, E + K, d))`` in the order the image run receives them."""
    contents = sel.tokens if sel.tokens is not None else tokens.gather(
        1, sel.indices[..., None].expand(-1, -1, tokens.shape[-1]))
    order = sel.order if sel.order is not None else torch.arange(sel.indices.shape[1]).expand_as(sel.indices)
    contents = contents.gather(1, order[..., None].expand(-1, -1, contents.shape[-1]))
    run = contents if sel.extra is None else torch.cat([sel.extra, contents] if sel.extra_first
                                                       else [contents, sel.extra], 1)
    return sel.indices.gather(1, order), run


@pytest.mark.parametrize("case", list(CASES))
def test_default_reproduces_the_released_tower_output(case):
    inputs = case_inputs(case)
    sel = method_for(case).select(inputs)
    dominant, targets = TENSORS[f"{case}.dominant_indices"], TENSORS[f"{case}.target_indices"]
    # the same kept patches, emitted as the released code does: dominant by index, then contextual
    assert sel.indices.shape[1] == inputs.keep - 1
    order, run = emitted(sel, inputs.tokens)
    assert torch.equal(order, torch.cat([dominant, targets], 1))
    assert sel.extra is not None and sel.extra_first and sel.extra.shape[1] == 1
    assert_close_relative(run, TENSORS[f"{case}.output"])


@pytest.mark.parametrize("case", ["n576_k64", "n60_tie"])
def test_our_mean_merge_and_positions_order_differ_from_the_released_code(case):
    inputs = case_inputs(case)
    reference = TENSORS[f"{case}.output"]
    c = CASES[case]["contextual"]
    _, run = emitted(method_for(case, merge="mean").select(inputs), inputs.tokens)
    assert torch.allclose(run[:, :-c], reference[:, :-c])  # CLS and dominant tokens unchanged
    assert not torch.allclose(run[:, -c:], reference[:, -c:], atol=1e-3)
    sel = method_for(case, order="positions").select(inputs)
    assert sel.order is None and torch.equal(sel.indices, sel.indices.sort(1).values)


def test_without_cls_every_dominant_token_is_a_patch():
    case = "n576_k64"
    for sel in (VisionZip().select(case_inputs(case, with_cls=False)),
                VisionZip(cls="drop").select(case_inputs(case))):
        assert sel.extra is None and sel.indices.shape[1] == 64
        top54 = TENSORS["n576.cls_attention"].topk(54, 1).indices
        assert bool(torch.isin(top54, sel.indices).all())


def test_in_a_vision_block_tokens_stay_in_place():
    sel = VisionZip().select(case_inputs("n576_k64", site="vision.12", with_cls=False))
    assert sel.order is None and sel.extra is None
