"""The post-projector site ``llm.0`` and tokens a method makes itself (``Selection.extra``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs


@dataclass
class _EveryOtherPlusSummary(Method):
    """Keeps even tokens and adds their mean (before or after them), remembering what it saw."""

    name = "every_other_plus_summary"
    stages = ("projector", "llm")
    makes_extra_tokens = True
    first: bool = False

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen = inputs.tokens
        b = inputs.tokens.shape[0]
        indices = torch.arange(0, 2 * (inputs.keep - 1), 2).expand(b, -1)
        summary = inputs.tokens.mean(1, keepdim=True)
        return Selection(indices, extra=summary, extra_first=self.first)


def _image_embeddings(backbone, batch) -> list[torch.Tensor]:
    """The image run each row's LLM receives, ``(count, d)`` per row."""
    inputs = backbone.prepare(**batch)
    is_image = inputs.input_ids == backbone.image_token_id
    return [inputs.inputs_embeds[b][is_image[b]] for b in range(is_image.shape[0])]


def test_llm0_sees_the_llm_input_embeddings(backbone, batch):
    plain = backbone.encode_images(batch["pixel_values"])  # (B, 64, d_text): the projector's output
    method = _EveryOtherPlusSummary()
    handle = attach(backbone, method, 9, site="llm.0")
    try:
        runs = _image_embeddings(backbone, batch)
    finally:
        handle.detach()
    assert torch.equal(method.seen, plain)
    for b, run in enumerate(runs):
        assert run.shape[0] == 9
        torch.testing.assert_close(run[:8], plain[b, 0:16:2])
        torch.testing.assert_close(run[8], plain[b].mean(0))
    assert handle.last_kept["every_other_plus_summary@llm.0:9"][0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, -3]
    assert handle.last_counts["every_other_plus_summary@llm.0:9"] == (64, 9)


@pytest.mark.parametrize("first", [True, False])
def test_extra_tokens_at_the_projector_pass_through_it(backbone, batch, first):
    method = _EveryOtherPlusSummary(first=first)
    handle = attach(backbone, method, 5, site="projector")
    try:
        runs = _image_embeddings(backbone, batch)
    finally:
        handle.detach()
    projector = backbone.projector
    kept = projector(method.seen[:, 0:8:2])
    summary = projector(method.seen.mean(1, keepdim=True))
    expected = torch.cat([summary, kept] if first else [kept, summary], 1)
    for b, run in enumerate(runs):
        torch.testing.assert_close(run, expected[b])
    marks = handle.last_kept["every_other_plus_summary@projector:5"][0].tolist()
    assert marks == ([-3, 0, 2, 4, 6] if first else [0, 2, 4, 6, -3])


def test_a_later_llm_stage_keeps_or_drops_extra_tokens_like_any_other(backbone, batch):
    handle = attach(backbone, [(_EveryOtherPlusSummary(first=True), "projector", 9), ("random", "llm.1", 4)])
    try:
        backbone.forward(**batch)
    finally:
        handle.detach()
    tower, llm = handle.last_kept.values()
    for before, after in zip(tower.tolist(), llm.tolist()):
        assert set(after) <= set(before) and len(after) == 4


def test_extra_tokens_are_refused_in_soft_mode(backbone):
    with pytest.raises(TokensieveError, match="soft mode cannot hold"):
        attach(backbone, _EveryOtherPlusSummary(), 9, site="projector", mode="soft")


def test_extra_tokens_inside_the_llm_without_a_position_are_refused_in_the_pass(backbone, batch):
    handle = attach(backbone, _EveryOtherPlusSummary(), 9, site="llm.1")  # positions kept, no extra_at given
    try:
        with pytest.raises(TokensieveError, match=r"^[^\n]*renumbered or each taking a token's .Selection.extra_at"):
            backbone.forward(**batch)
    finally:
        handle.detach()


def test_a_wrong_count_with_extra_tokens_is_refused(backbone, batch):
    @dataclass
    class _TooMany(_EveryOtherPlusSummary):
        name = "too_many"

        def select(self, inputs):
            sel = super().select(inputs)
            return Selection(torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1), extra=sel.extra)

    handle = attach(backbone, _TooMany(), 9, site="projector")
    try:
        with pytest.raises(TokensieveError, match=r"indices of shape \(6, 9\), expected \(6, 8\)"):
            backbone.forward(**batch)
    finally:
        handle.detach()


@dataclass
class _ReversedFirstHalf(Method):
    """Keeps the first tokens and emits them in reverse order."""

    name = "reversed_first_half"
    stages = ("vision", "projector", "llm")

    def select(self, inputs: SiteInputs) -> Selection:
        b = inputs.tokens.shape[0]
        order = torch.arange(inputs.keep - 1, -1, -1).expand(b, -1)
        return Selection(torch.arange(inputs.keep).expand(b, -1), order=order)


def test_an_order_of_its_own_is_how_the_kept_tokens_enter_the_llm(backbone, batch):
    plain = backbone.encode_images(batch["pixel_values"])
    handle = attach(backbone, _ReversedFirstHalf(), 6, site="llm.0")
    try:
        runs = _image_embeddings(backbone, batch)
    finally:
        handle.detach()
    for b, run in enumerate(runs):
        torch.testing.assert_close(run, plain[b, :6].flip(0))
    assert handle.last_kept["reversed_first_half@llm.0:6"][0].tolist() == [5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("site,mode", [("llm.0", "soft"), ("vision.1", "hard")])
def test_an_order_of_its_own_is_refused_where_tokens_stay_in_place(backbone, batch, site, mode):
    handle = attach(backbone, _ReversedFirstHalf(), 6, site=site, mode=mode)
    try:
        with pytest.raises(TokensieveError, match="in hard mode only"):
            backbone.forward(**batch)
    finally:
        handle.detach()
