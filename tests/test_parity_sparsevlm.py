"""SparseVLM v1 against its released code (Gumpest/SparseVLMs@b72c5d6, modelling_sparse_llama.py,
score.py, utils.py).

Four fixtures: ``sparsevlm_raters`` (the raters chosen from the input embeddings),
``sparsevlm_rank`` (``attn_postprocess_rank``: the rank, the scores and the kept tokens),
``sparsevlm_recycle`` (the top 30% + 1 of the pruned and ``cluster_and_merge``) and
``sparsevlm_step`` (a whole pruning step: kept tokens, recycled tokens inserted after them,
positions renumbered), the last also through the method's ``select`` as the engine calls it."""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import assert_close_relative, load_fixture

from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, SiteInputs
from tokensieve.methods import create_method, sparsevlm
from tokensieve.methods.sparsevlm import (
    SparseVLM,
    cluster_count,
    dpc_knn_merge,
    recycled_count,
    sparsevlm_layers,
    sparsevlm_rank,
    sparsevlm_raters,
    sparsevlm_recycle,
    sparsevlm_step,
)

RATERS, RATERS_META = load_fixture("sparsevlm_raters")
RANK, RANK_META = load_fixture("sparsevlm_rank")
RECYCLE, RECYCLE_META = load_fixture("sparsevlm_recycle")
STEP, STEP_META = load_fixture("sparsevlm_step")


@pytest.mark.parametrize("case", list(RATERS_META["cases"]))
def test_raters_are_the_released_ones(case):
    relevance, raters = sparsevlm_raters(RATERS[f"{case}.image"], RATERS[f"{case}.text"])
    assert_close_relative(relevance, RATERS[f"{case}.relevance"])
    assert torch.equal(raters, RATERS[f"{case}.raters"].bool())
    assert int(raters.sum()) == RATERS_META["cases"][case]["raters"]


@pytest.mark.parametrize("case", list(RANK_META["cases"]))
def test_rank_scores_and_kept_tokens_are_the_released_ones(case):
    spec = RANK_META["cases"][case]
    raters = RANK[f"{case}.raters"][0].bool()
    kept, relation, rank = sparsevlm_rank(RANK[f"{case}.attention"][0], raters, spec["scale"], spec["bias"])
    assert rank == int(RANK[f"{case}.rank"][0]) == spec["rank"]
    assert kept.tolist() == RANK[f"{case}.kept"][0].tolist()
    assert (kept.numel() < spec["image_tokens"]) == spec["s_flag"]
    if spec["raters"]:
        assert_close_relative(relation, RANK[f"{case}.relation"][0])
    else:  # a mean over no rater, as released
        assert bool(relation.isnan().all()) and bool(RANK[f"{case}.relation"].isnan().all())


@pytest.mark.parametrize("case", list(RECYCLE_META["cases"]))
def test_recycled_tokens_and_their_clusters_are_the_released_ones(case):
    spec = RECYCLE_META["cases"][case]
    pruned = RECYCLE[f"{case}.pruned_tokens"][0]
    recycled, merged, _ = sparsevlm_recycle(pruned, RECYCLE[f"{case}.pruned_relation"], RECYCLE[f"{case}.noise"][0])
    assert recycled.tolist() == RECYCLE[f"{case}.recycled"][0].tolist()  # in topk order: the clustering's input
    assert (recycled_count(spec["pruned"]), cluster_count(spec["recycled"])) == (spec["recycled"], spec["clusters"])
    assert_close_relative(merged, RECYCLE[f"{case}.merged"][0])


def _step_parts(case: str) -> dict:
    """The fixture's step as a site sees it: image run, post-image attention, input embeddings."""
    spec = STEP_META["cases"][case]
    pre, v = spec["prefix"], spec["image_tokens"]
    embeds = STEP[f"{case}.input_embeds"]
    return {"spec": spec, "pre": pre, "v": v, "output": STEP[f"{case}.layer_output"],
            "image": STEP[f"{case}.layer_output"][:, pre:pre + v], "attention": STEP[f"{case}.attention"],
            "entry_image": embeds[:, pre:pre + 576], "entry_text": embeds[:, pre + 576:]}


@pytest.mark.parametrize("case", list(STEP_META["cases"]))
def test_a_whole_pruning_step_is_the_released_one(case):
    p = _step_parts(case)
    _, raters = sparsevlm_raters(p["entry_image"], p["entry_text"])
    assert torch.equal(raters, STEP[f"{case}.raters"].bool())
    noise = STEP[f"{case}.noise"][0]

    def draw(count):
        assert count == noise.numel()
        return noise

    kept, merged, _ = sparsevlm_step(p["image"][0], p["attention"][0], raters[0], p["spec"]["scale"],
                                  p["spec"]["bias"], draw)
    assert kept.tolist() == STEP[f"{case}.kept"][0].tolist()
    assert merged.shape[0] == p["spec"]["recycled_clusters"]
    out, pre, v = p["output"][0], p["pre"], p["v"]
    sequence = torch.cat([out[:pre], out[pre:pre + v][kept], merged, out[pre + v:]])
    assert_close_relative(sequence, STEP[f"{case}.new_sequence"][0])
    assert STEP[f"{case}.new_position_ids"][0].tolist() == list(range(sequence.shape[0]))


def _site_inputs(image, attention, entry_image, entry_text, seeds, valid=None, text_valid=None) -> SiteInputs:
    """What the engine hands the method at a pruning site: the image run ``(B, N, d)`` (the pruning
    layer's output), the post-image attention ``(B, T, N)``, the input embeddings of the original
    image run ``(B, 576, d)`` and of the tokens after it ``(B, T, d)``."""
    text_valid = torch.ones(entry_text.shape[:2], dtype=torch.bool) if text_valid is None else text_valid
    return SiteInputs(image, image.shape[1], "llm.3", [torch.Generator().manual_seed(s) for s in seeds],
                      {"post_image_attention": lambda: attention, "input_image_embeddings": lambda: entry_image},
                      lambda: (entry_text, text_valid), valid, {"input_embeddings": lambda: entry_text})


@pytest.mark.parametrize("case", list(STEP_META["cases"]))
def test_select_is_the_released_step(case):
    """The kept tokens and the recycled ones as the engine receives them (the density noise, drawn
    here from the row's generator, does not decide these clusters)."""
    p = _step_parts(case)
    method = SparseVLM().for_budget(Budget.parse(p["spec"]["budget"]))
    sel = method.select(_site_inputs(p["image"], p["attention"], p["entry_image"], p["entry_text"], [0]))
    kept = STEP[f"{case}.kept"]
    assert torch.equal(sel.indices, kept) and bool(sel.valid.all())
    k, c = kept.shape[1], p["spec"]["recycled_clusters"]
    assert sel.extra.shape[1] == c and bool(sel.extra_valid.all()) and not sel.extra_first
    assert_close_relative(sel.extra, STEP[f"{case}.new_sequence"][:, p["pre"] + k:p["pre"] + k + c])


def _alone(case: str, seed: int, first: int = 0):
    """The method on one step fixture alone, with the tokens after the image from ``first`` on."""
    p = _step_parts(case)
    return SparseVLM().for_budget(Budget.parse(192)).select(
        _site_inputs(p["image"], p["attention"][:, first:], p["entry_image"], p["entry_text"][:, first:], [seed]))


def test_rows_of_a_batch_are_each_row_alone():
    """Two rows keeping different counts (the second with a shorter text, padded on the left):
    padded kept slots and padded recycled slots, each row's real ones those it keeps alone."""
    rows = [_step_parts("layer2_192"), _step_parts("layer2_64")]
    batch = {name: torch.cat([p[name] for p in rows]) for name in ("image", "attention", "entry_image", "entry_text")}
    text_valid = torch.ones(2, batch["entry_text"].shape[1], dtype=torch.bool)
    text_valid[1, :20] = False
    sel = SparseVLM().for_budget(Budget.parse(192)).select(_site_inputs(**batch, seeds=[3, 4], text_valid=text_valid))
    for r, (case, seed, first) in enumerate([("layer2_192", 3, 0), ("layer2_64", 4, 20)]):
        alone = _alone(case, seed, first)
        assert sel.indices[r][sel.valid[r]].tolist() == alone.indices[0].tolist()
        assert torch.equal(sel.extra[r][sel.extra_valid[r]], alone.extra[0])
    assert not bool(sel.valid.all()) and not bool(sel.extra_valid.all())


def test_padding_in_the_image_run_and_the_text_is_skipped():
    """A later site in a batch: slots that only pad the image run (valid False) and question rows
    that only pad on the left; the row keeps and recycles what it does without them."""
    p = _step_parts("later_layer_192")
    n, t = p["v"], p["entry_text"].shape[1]
    slots = torch.tensor(sorted(set(range(n + 9)) - {0, 5, 100, 101, 150, 200, 260, 301, n + 8}))  # real slots
    image = torch.randn(1, n + 9, p["image"].shape[2])
    image[:, slots] = p["image"]
    attention = torch.rand(1, t + 3, n + 9)
    attention[:, 3:, slots] = p["attention"]
    text = torch.cat([torch.randn(1, 3, p["entry_text"].shape[2]), p["entry_text"]], 1)
    valid = torch.zeros(1, n + 9, dtype=torch.bool)
    valid[:, slots] = True
    text_valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, t, dtype=torch.bool)], 1)
    sel = SparseVLM().for_budget(Budget.parse(192)).select(_site_inputs(image, attention, p["entry_image"], text, [1],
                                                          valid=valid, text_valid=text_valid))
    alone = _alone("later_layer_192", 1)
    assert sel.indices[0][sel.valid[0]].tolist() == slots[alone.indices[0]].tolist()
    assert bool(valid.gather(1, sel.indices)[sel.valid].all())
    assert_close_relative(sel.extra, alone.extra)


def test_a_row_without_raters_keeps_its_image_run():
    """One token after the image: no rater (the released scores are NaN there); nothing pruned."""
    p = _step_parts("layer2_192")
    sel = SparseVLM().for_budget(Budget.parse(192)).select(
        _site_inputs(p["image"], p["attention"][:, -1:], p["entry_image"], p["entry_text"][:, -1:], [0]))
    assert sel.indices.tolist() == [list(range(576))] and sel.extra is None


def test_a_single_rater_at_the_64_setting_keeps_only_recycled_tokens():
    """Two tokens after the image give one rater, rank 1, and int(1 * 0.8) = 0 tokens kept: as
    released, every image token is pruned and the image run is the recycled clusters alone."""
    p = _step_parts("layer2_64")
    sel = SparseVLM().for_budget(Budget.parse(64)).select(
        _site_inputs(p["image"], p["attention"][:, -2:], p["entry_image"], p["entry_text"][:, -2:], [0]))
    assert sel.indices.shape == (1, 0) and sel.valid.shape == (1, 0)
    assert sel.extra.shape == (1, cluster_count(recycled_count(576)), p["image"].shape[2])


def test_budgets_choose_the_released_scale_and_bias():
    for budget, knobs in {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0), 1 / 3: (13.5, 0.0),
                          "22.2%": (9.0, 6.0), Budget(count=64): (0.8, 0.0), 0.33: (13.5, 0.0),
                          0.22: (9.0, 6.0), 0.11: (0.8, 0.0)}.items():
        method = SparseVLM().for_budget(Budget.parse(budget))
        assert (method.scale, method.bias) == knobs
    assert SparseVLM(scale=2.0).for_budget(Budget.parse(128)).bias == 6.0
    explicit = SparseVLM(scale=5.0, bias=1.0)
    assert explicit.for_budget(Budget.parse(100)) is explicit
    with pytest.raises(TokensieveError, match="192 -> scale 13.5, bias 0.*scale= and bias="):
        SparseVLM().for_budget(Budget.parse(100))
    with pytest.raises(TokensieveError, match="scale= and bias="):
        SparseVLM().for_budget(Budget.parse(0.3))  # 173 of 576: more than a percent from any setting
    with pytest.raises(TokensieveError, match="count setting"):
        SparseVLM().select(_site_inputs(torch.zeros(1, 4, 2), torch.zeros(1, 2, 4), torch.zeros(1, 4, 2),
                                        torch.zeros(1, 2, 2), [0]))


def test_schedule_prunes_after_layers_2_6_15_19_of_32():
    method = create_method("sparsevlm").for_budget(Budget.parse(192))
    assert method.schedule("llm", Budget(count=192), 32) == [(f"llm.{k}", Budget(ratio=1.0)) for k in (3, 7, 16, 20)]
    assert sparsevlm_layers(32) == (3, 7, 16, 20)
    assert sparsevlm_layers(24) == (2, 5, 12, 15)
    assert sparsevlm_layers(4) == (1, 2)
    assert method.schedule("llm.3", Budget(count=192), 32)[0][0] == "llm.3"
    with pytest.raises(TokensieveError, match="go past the LLM's 16 layers"):
        SparseVLM(layers=(3, 16)).schedule("llm", Budget(count=192), 16)
    with pytest.raises(TokensieveError, match="not at one site"):
        method.schedule("llm.5", Budget(count=192), 32)
    with pytest.raises(TokensieveError, match="depth"):
        SparseVLM().schedule("llm", Budget(count=192))
    with pytest.raises(TokensieveError, match="increasing"):
        SparseVLM(layers=(7, 3))
    with pytest.raises(TokensieveError, match="llm.0"):
        method.check(576, 576, "llm.0")


def test_engine_facing_properties():
    method = create_method("sparsevlm", scale=13.5, bias=0.0)
    assert method.count_per_row and method.renumbers_positions and method.makes_extra_tokens
    assert not SparseVLM(positions="original").renumbers_positions
    assert create_method(method.config()) == method
    with pytest.raises(TokensieveError, match="positions"):
        SparseVLM(positions="gapless")


def test_clustering_in_row_blocks_is_the_released_broadcast_bit_for_bit(monkeypatch):
    """DPC-KNN's distances are computed a few rows at a time; one block of every row is the released
    ``(x1 - x2).norm(dim=-1)`` over the whole ``(n, n, d)`` difference: clusters and centres must not move."""
    x, noise = torch.randn(200, 64, generator=torch.Generator().manual_seed(3)), torch.rand(200)
    blocked = dpc_knn_merge(x, 21, noise)
    assert sparsevlm.DISTANCE_BLOCK // (200 * 64) < 200, "the default splits these rows into blocks"
    monkeypatch.setattr(sparsevlm, "DISTANCE_BLOCK", 200 * 200 * 64)
    whole = dpc_knn_merge(x, 21, noise)
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mirrored_distances_are_the_released_broadcast_bit_for_bit(monkeypatch, dtype):
    """Blocks of rows against the rows from theirs on, mirrored, give ``(x1 - x2).norm(dim=-1)`` exactly,
    odd widths and a last short block included."""
    x = torch.randn(131, 37, generator=torch.Generator().manual_seed(4)).to(dtype)
    monkeypatch.setattr(sparsevlm, "DISTANCE_BLOCK", 131 * 37 * 10)  # blocks of 10 rows, the last of 1
    assert torch.equal(sparsevlm.pairwise_distances(x), (x[:, None] - x[None]).norm(dim=-1))

