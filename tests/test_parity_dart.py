"""DART against the authors' released code (tests/fixtures/parity/dart.*): the same kept image
tokens, to the index, in the paper configuration and small cases, from the same layer K-1 keys and
normed states, including the claiming order the reference takes from a Python set."""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import load_fixture

from tokensieve.method import SiteInputs
from tokensieve.methods.dart import DART, dart_keep, topk_among, unit_vectors

TENSORS, META = load_fixture("dart")
CASES = sorted(META["cases"])


def layout(name: str) -> dict:
    """The reference's sample as our signals: image run and text tokens after it, keys with the heads
    concatenated per token as the reference's ``permute(0, 2, 1, 3).reshape`` does."""
    case = META["cases"][name]
    start, n = case["image_token_start_index"], case["image_token_length"]
    dtype = getattr(torch, case["dtype"])
    keys = TENSORS[f"{name}.keys"]  # (H, L, d_head)
    keys = keys.permute(1, 0, 2).reshape(keys.shape[1], -1).to(dtype)  # (L, H * d_head)
    normed = TENSORS[f"{name}.normed"].to(dtype)
    where = torch.arange(normed.shape[0])
    image, text = slice(start, start + n), slice(start + n, None)
    return {"keys": keys[image], "states": normed[image], "positions": where[image],
            "question_keys": keys[text], "question_states": normed[text], "question_positions": where[text],
            "pivots": (case["pivot_image_token"], case["pivot_text_token"]), "keep": case["kept"]}


def site_inputs(rows: list[dict], pad: int = 0) -> SiteInputs:
    """A batch of samples at ``llm.2``; every question is left-padded by ``pad`` more rows whose keys
    are huge (they would be the text pivots if padding were read)."""
    def stack(key, question=False, fill=0.0):
        values = [row[key] for row in rows]
        if question:
            width = max(len(v) for v in values) + pad
            values = [torch.cat([torch.full((width - len(v), *v.shape[1:]), fill, dtype=v.dtype), v]) for v in values]
        return torch.stack(values)

    t = max(len(row["question_keys"]) for row in rows) + pad
    valid = torch.stack([torch.arange(t) >= t - len(row["question_keys"]) for row in rows])
    q_keys, q_states = stack("question_keys", True, 1e4), stack("question_states", True, 1.0)
    signals = {"prev_layer_keys": lambda: stack("keys"), "normed_states": lambda: stack("states"),
               "positions": lambda: stack("positions")}
    question = {"prev_layer_keys": lambda: q_keys, "normed_states": lambda: q_states,
                "positions": lambda: stack("question_positions", True, -1)}
    states = stack("states")
    return SiteInputs(states, rows[0]["keep"], "llm.2", [torch.Generator()] * len(rows), signals,
                      question_states=lambda: (q_states, valid), question_signals=question)


def test_fixture_is_the_paper_configuration_and_order_sensitive():
    paper = META["cases"]["paper128"]
    assert (paper["image_token_length"], paper["max_num_trunction"], paper["kept"]) == (576, 128, 132)
    assert (paper["pivot_image_token"], paper["pivot_text_token"]) == (4, 4)
    # The same states 12 positions later: only the set's iteration order differs, and the result with it.
    assert not torch.equal(TENSORS["paper128.kept"], TENSORS["paper128_start47.kept"])


@pytest.mark.parametrize("name", CASES)
def test_kept_tokens_equal_the_reference(name):
    row = layout(name)
    p_image, p_text = row["pivots"]
    sel = DART(pivot_image_tokens=p_image, pivot_text_tokens=p_text).select(site_inputs([row]))
    assert sel.valid is None  # the budget is the reference's own count: nothing to fill
    assert torch.equal(sel.indices[0], TENSORS[f"{name}.kept"])


def test_positions_alone_decide_the_claiming_order():
    row = layout("paper128")
    moved = dict(row, positions=row["positions"] + 12, question_positions=row["question_positions"] + 12)
    assert torch.equal(DART().select(site_inputs([moved])).indices[0], TENSORS["paper128_start47.kept"])


def test_a_padded_batch_gives_each_row_its_reference_result():
    rows = [layout("paper128"), layout("paper128_start47")]
    rows[1] = dict(rows[1], question_keys=rows[1]["question_keys"][5:], question_states=rows[1]["question_states"][5:],
                   question_positions=rows[1]["question_positions"][5:])
    alone = DART().select(site_inputs(rows[1:])).indices[0]
    together = DART().select(site_inputs(rows, pad=3)).indices
    assert torch.equal(together[0], TENSORS["paper128.kept"])
    assert torch.equal(together[1], alone)


def test_pure_function_with_the_paper_count():
    row = layout("paper64")
    kept = dart_keep(row["keys"][None], row["states"][None], row["positions"][None], 68,
                     question_keys=row["question_keys"][None], question_states=row["question_states"][None],
                     question_positions=row["question_positions"][None],
                     question_valid=torch.ones(1, len(row["question_keys"]), dtype=torch.bool))
    assert torch.equal(kept[0], TENSORS["paper64.kept"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cosines_of_unit_vectors_are_torchs_cosine_similarity_bit_for_bit(dtype):
    """The pivots' cosines are computed from tokens normalised once; they must be the released
    ``F.cosine_similarity`` values to the bit (a zero token gives NaN on both sides in float16)."""
    g = torch.Generator().manual_seed(6)
    states, pivot = torch.randn(3, 200, 77, generator=g).to(dtype), torch.randn(3, 1, 77, generator=g).to(dtype)
    states[:, 5] = 0
    ours = (unit_vectors(pivot) * unit_vectors(states)).sum(-1)
    theirs = torch.nn.functional.cosine_similarity(pivot, states, dim=-1)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(2.0), theirs.nan_to_num(2.0))


def test_topk_among_is_topk_of_the_indexed_list_ties_included():
    """Rows of one count together and of different counts apart pick what ``topk`` of each row's list of
    allowed values picks, equal values included."""
    g = torch.Generator().manual_seed(7)
    values = torch.randint(0, 4, (3, 60), generator=g).float()  # many exact ties
    uneven = torch.rand(3, 60, generator=g) > 0.3
    even = torch.stack([torch.randperm(60, generator=g) < 40 for _ in range(3)])  # 40 allowed in every row
    for among in (uneven, even):
        counts = among.sum(1).tolist()
        got = topk_among(values, among, counts, 9)
        for r in range(3):
            allowed = among[r].nonzero()[:, 0]
            assert torch.equal(got[r], allowed[values[r, allowed].topk(9).indices])
