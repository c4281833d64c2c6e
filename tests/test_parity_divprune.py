"""DivPrune's default reproduces the released selection (vbdi/divprune, ``LlavaMetaForCausalLM.DivPrune``).

The fixture holds seeded projector-output-like tokens and the picks the released function made
for them: the paper's 0.098 of 576 tokens (and 0.1, 0.25, 0.5), a small case, the paper case in
float16, exact duplicates (a flat padded region), and a degenerate case with more picks than
distinct tokens, where the released code repeats tokens and ours cannot.
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import load_fixture

from tokensieve.method import Budget, SiteInputs
from tokensieve.methods.divprune import DivPrune, divprune_keep

TENSORS, META = load_fixture("divprune")
CASES = META["cases"]
DEFINED = [name for name in CASES if not name.startswith("degenerate")]


def case_inputs(name: str) -> SiteInputs:
    spec = CASES[name]
    tokens = TENSORS[spec["tokens"]].to(getattr(torch, spec["dtype"]))
    keep = Budget.parse(spec["threshold_ratio"]).resolve(spec["n"])
    assert keep == spec["keep"]  # round(ratio * N), the released int(round(ratio * N))
    return SiteInputs(tokens, keep, "llm.0", [torch.Generator()] * spec["batch"])


@pytest.mark.parametrize("name", DEFINED)
def test_default_keeps_what_the_released_code_keeps(name):
    inputs = case_inputs(name)
    sel = DivPrune().select(inputs)
    assert torch.equal(sel.indices, TENSORS[f"{name}.kept"])  # both sorted: the same sets
    assert sel.tokens is None


def test_the_paper_configuration_is_the_default():
    assert DivPrune.default_site == "llm.0" and "llm" in DivPrune.stages
    assert DivPrune() == DivPrune(full_precision=False)
    assert CASES["n576_r0098"]["keep"] == 56 and "0.098" in META["configuration"]


def test_distances_in_float32_would_not_match_the_float16_reference():
    """The float16 case tells the dtypes apart: the same tokens with float32 distances keep others."""
    inputs = case_inputs("n576_r0098_fp16")
    ours = divprune_keep(inputs.tokens, inputs.keep, full_precision=True)
    assert not torch.equal(ours, TENSORS["n576_r0098_fp16.kept"])


def test_exact_copies_tie_to_the_first_and_only_one_is_kept():
    kept = TENSORS["dup_n40_k8.kept"][0].tolist()
    copies = [i for i in kept if 20 <= i < 30]
    assert copies == [20]


def test_where_the_released_code_repeats_a_token_ours_keeps_its_distinct_picks_and_no_repeats():
    spec = CASES["degenerate_n24_k10"]
    picks = TENSORS["degenerate_n24_k10.picks"][0].tolist()
    assert spec["distinct_picks_per_row"] == [6] and len(set(picks)) < len(picks)
    ours = DivPrune().select(case_inputs("degenerate_n24_k10")).indices[0].tolist()
    assert len(set(ours)) == spec["keep"]
    assert set(picks[:6]) <= set(ours)  # one per distinct token, chosen as the released code does
