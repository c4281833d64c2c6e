"""FastV's default reproduces the released selection (pkunlp-icler/FastV, ``LlamaModel.forward``).

The fixture holds seeded per-head attention rows of the prompt's last token at layer K-1 and the
image tokens the released lines keep for them: the paper's K=2 R=50% on an LLaVA-1.5 prompt, the
ablation's R=25/75/87.5%, a float16 case with ties at the boundary, and a small case.
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import load_fixture

from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, SiteInputs
from tokensieve.methods.fastv import FastV, fastv_keep

TENSORS, META = load_fixture("fastv")
RUNS = [(case, key) for case, spec in META["cases"].items() for key in spec["runs"]]


def text_attention(case: str) -> torch.Tensor:
    """``(B, N)`` what the ``text_attention`` signal holds: the head mean of the last row's attention
    weights (in the model's dtype) at the image columns."""
    spec = META["cases"][case]
    rows = TENSORS[f"{case}.attention_last_row"].to(getattr(torch, spec["dtype"]))
    start = spec["sys_length"]
    return rows.mean(1)[:, start:start + spec["image_tokens"]]


@pytest.mark.parametrize("case,key", RUNS)
def test_default_keeps_what_the_released_code_keeps(case, key):
    spec, run = META["cases"][case], META["cases"][case]["runs"][key]
    n = spec["image_tokens"]
    keep = Budget.parse(1 - run["R_dropped"]).resolve(n)  # the budget is the kept share, 1 - R
    assert keep == run["attention_rank"]
    signal = text_attention(case)
    tokens = torch.zeros(spec["batch"], n, 4)
    inputs = SiteInputs(tokens, keep, "llm.2", [torch.Generator()] * spec["batch"],
                        {"text_attention": lambda: signal})
    sel = FastV().select(inputs)
    expected = TENSORS[key]
    assert torch.equal(sel.indices, expected)  # both sorted: the same sets, the same order
    assert torch.equal(fastv_keep(signal, keep), expected)


def test_the_paper_configuration_is_the_default():
    assert FastV.default_site == "llm.2" and FastV.signals == ("text_attention",)
    assert "K=2" in META["configuration"] and Budget.parse(0.5).resolve(576) == 288


def test_the_float16_case_has_ties_at_the_boundary():
    """Otherwise the case would not test how ties break."""
    (run,) = META["cases"]["llava15_fp16_ties"]["runs"].values()
    assert min(run["tied_at_boundary"]) > 1


def test_ranking_by_another_signal_would_not_match():
    """The fixture tells signals apart: one head instead of the mean, or the image columns off by
    one, keeps other tokens."""
    spec = META["cases"]["llava15"]
    rows = TENSORS["llava15.attention_last_row"]
    one_head = rows[:, 0, spec["sys_length"]:spec["sys_length"] + spec["image_tokens"]]
    shifted = rows.mean(1)[:, spec["sys_length"] + 1:spec["sys_length"] + 1 + spec["image_tokens"]]
    expected = TENSORS["llava15.kept_R0500"]
    assert not torch.equal(fastv_keep(one_head, 288), expected)
    assert not torch.equal(fastv_keep(shifted, 288), expected)


def test_llm0_is_refused():
    with pytest.raises(TokensieveError, match="llm.K with K >= 1"):
        FastV().check(576, 288, "llm.0")
    FastV().check(576, 288, "llm.2")
