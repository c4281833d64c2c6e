"""Tokens a method makes inside the LLM on the families that choose row by row (Qwen-VL, LLaVA-NeXT) and on
LLaVA-1.5: where they enter the sequence and which position they take (:mod:`tokensieve.backbones.row_removal`).

A method here drops a row's last visual token and makes it again as a token of its own. With positions kept
(Qwen-VL, LLaVA-1.5) the made token takes the dropped token's position (``Selection.extra_at``) and enters
right after the row's last image run, which is where that token was: the pass must equal keeping it. With
positions renumbered (LLaVA-NeXT), every real column after the drop is numbered without gaps, the made token
right after the last image run and before the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_qwen import ROWS, inputs

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs

KEEP = 4


@dataclass
class LastTokenMade(Method):
    """Keeps ``keep - 1`` evenly spaced tokens and the last one: the last as it is (``made=False``) or dropped
    and made again as a token of its own at its position (``made=True``; ``at=False``: no position given)."""

    name = "last_token_made"
    stages = ("llm",)
    default_site = "llm.2"
    makes_extra_tokens = True
    made: bool = True
    at: bool = True
    renumbered: bool = False

    @property
    def renumbers_positions(self) -> bool:
        return self.renumbered

    def select(self, inputs: SiteInputs) -> Selection:
        tokens, keep = inputs.tokens, inputs.keep
        b, n, _ = tokens.shape
        spaced = torch.linspace(0, n - 2, keep - 1).round().long().expand(b, -1)
        last = spaced.new_full((b, 1), n - 1)
        if not self.made:
            return Selection(torch.cat([spaced, last], 1))
        return Selection(spaced, extra=tokens[:, n - 1:], extra_at=last if self.at else None)


@dataclass
class Positions(Method):
    """Keeps every token and records the positions of the visual tokens and of the question."""

    name = "positions_recorder"
    stages = ("llm",)
    default_site = "llm.2"
    signals = ("positions",)

    def __post_init__(self):
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen.append((inputs.signal("positions")[0], inputs.question_signal("positions")[0]))
        return Selection(torch.arange(inputs.tokens.shape[1])[None])


def made_and_kept(backbone, batch: dict, site: str) -> dict[bool, torch.Tensor]:
    """The last logits ``(B, vocab)`` with each row's last visual token kept (False) and made again (True)."""
    logits = {}
    for made in (False, True):
        handle = attach(backbone, LastTokenMade(made=made), KEEP, site=site)
        try:
            with torch.no_grad():
                logits[made] = backbone.forward(**batch).logits[:, -1]
            kept = handle.last_kept[str(handle.stages[0])]
            assert bool((kept[:, KEEP - 1] == -3).all()) == made, "recorded as a made token (-3)"
        finally:
            handle.detach()
    return logits


def test_a_made_token_at_its_tokens_position_equals_keeping_that_token_on_qwen(qwen):
    logits = made_and_kept(qwen, inputs(qwen, ROWS), "llm.2")  # rows of different image sizes, one with two images
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_a_made_token_at_its_tokens_position_equals_keeping_that_token_on_llava(backbone, batch):
    logits = made_and_kept(backbone, batch, "llm.1")
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_positions_renumbered_after_a_made_token_on_llava_next(llava_next, next_batch):
    recorder = Positions()
    one_row = {name: value[:1] for name, value in next_batch.items()}
    handle = attach(llava_next, [(LastTokenMade(renumbered=True, at=False), "llm.1", KEEP),
                                 (recorder, "llm.2", 1.0)])
    try:
        with torch.no_grad():
            llava_next.forward(**one_row)
    finally:
        handle.detach()
    (visual, question), = recorder.seen
    length = visual.new_tensor(int(one_row["attention_mask"].sum()))  # no padding in a batch of one row
    dropped = int(handle.last_counts[str(handle.stages[0])][0]) - (KEEP - 1)
    shorter = length - dropped + 1
    assert torch.equal(question, torch.arange(shorter - len(question), shorter)), "gap-free to the end"
    assert int(visual[-1]) == int(question[0]) - 1, "the made token right before the text"
    assert bool((visual[1:] > visual[:-1]).all()) and len(visual) == KEEP


def test_made_tokens_without_a_position_are_refused_where_positions_are_kept(qwen, mixed):
    handle = attach(qwen, LastTokenMade(at=False), KEEP, site="llm.2")
    try:
        with pytest.raises(TokensieveError, match=r"^[^\n]*extra_at[^\n]*$"), torch.no_grad():
            qwen.forward(**mixed)
    finally:
        handle.detach()


@pytest.mark.parametrize(("site", "mode", "says"), [("llm.0", "hard", "inside the LLM only"),
                                                     ("llm.2", "soft", "soft mode cannot")])
def test_made_tokens_refused_before_the_llm_and_in_soft_mode(qwen, site, mode, says):
    with pytest.raises(TokensieveError, match=rf"^[^\n]*{says}[^\n]*$"):
        attach(qwen, LastTokenMade(), KEEP, site=site, mode=mode)
    assert not qwen.sessions


def test_made_tokens_before_qwen3_deepstack_are_refused(qwen):
    if not qwen.deepstack_levels:
        pytest.skip("only Qwen3-VL adds DeepStack features inside the LLM")
    with pytest.raises(TokensieveError, match=r"^[^\n]*DeepStack[^\n]*layers >= 2[^\n]*$"):
        attach(qwen, {"name": "sparsevlm", "positions": "original"}, 64, site="llm")
    assert not qwen.sessions
