"""Stages inside the LLM (``llm.k``, ``k >= 1``) on the Qwen-VL adapter, on tiny random Qwen2-VL,
Qwen2.5-VL and Qwen3-VL models: each row chooses among all its visual tokens (rows of different
image counts and sizes), hard mode, positions kept (never renumbered). A padded batch
against each row alone, and generate with the cache, for every method: test_family_contract.py."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen import kept_of

from tokensieve.attach import attach
from tokensieve.backbones.base import Site
from tokensieve.backbones.llama_decoder import as_additive, log_mask
from tokensieve.errors import TokensieveError
from tokensieve.ops import topk_sorted

VISUAL = (16, 22)
# DART with exact_budget keeps the budget exactly (its paper's rule keeps a multiple of its pivots).
METHODS = {"fastv": "fastv", "dart": {"name": "dart", "exact_budget": True}}


@pytest.fixture(scope="module")
def site(qwen):
    """llm.1: on Qwen3-VL before its second DeepStack addition (the session adds it to the kept columns)."""
    return "llm.1"


def test_sites_and_signals(qwen, site):
    assert qwen.sites() == [Site("projector")] + [Site("llm", k) for k in range(3)]
    assert qwen.signals_at(Site.parse(site)) == {"text_attention", "prev_layer_keys", "normed_states", "positions",
                                                 "layer_text_attention",
                                                 "post_image_attention", "input_image_embeddings"}


@pytest.mark.parametrize("method", METHODS)
def test_budgets_per_row_keep_all_and_detach(qwen, mixed, plain, site, method):
    with torch.no_grad():
        handle = attach(qwen, METHODS[method], 1.0, site=site)
        assert torch.equal(qwen.forward(**mixed).logits, plain), "keep-all is the plain model bit for bit"
        handle.detach()
        handle = attach(qwen, METHODS[method], 0.5, site=site)
        pruned = qwen.forward(**mixed).logits
        assert [len(k) for k in kept_of(handle)] == [8, 11]  # half of each row's 16 and 22 visual tokens
        assert pruned.shape[1] == plain.shape[1] - 8  # the row dropping fewest (8) sets the length
        with handle.disabled():
            assert torch.equal(qwen.forward(**mixed).logits, plain)
        handle.detach()
        assert torch.equal(qwen.forward(**mixed).logits, plain), "detach restores the model bit for bit"
        handle = attach(qwen, METHODS[method], 10, site=site)
        qwen.forward(**mixed)
        assert [len(k) for k in kept_of(handle)] == [10, 10]
        handle.detach()


def test_fastv_keeps_the_top_of_the_models_own_attention(qwen, mixed, site):
    """FastV's choice is the top-k of layer k-1's attention from the last token (mean over heads) as
    the model's own eager attention returns it, over each row's visual columns."""
    k = int(site.split(".")[1])
    handle = attach(qwen, "fastv", 0.5, site=site)
    try:
        with torch.no_grad():
            qwen.forward(**mixed)
            kept = kept_of(handle)
            qwen.model.set_attn_implementation("eager")
            with handle.disabled():
                attentions = qwen.forward(**mixed, output_attentions=True).attentions
    finally:
        qwen.model.set_attn_implementation("sdpa")
        handle.detach()
    text = attentions[k - 1][:, :, -1].mean(1)  # (B, L)
    layout = qwen.layout(mixed["input_ids"], mixed["attention_mask"])
    for b, runs in enumerate(layout.runs):
        columns = torch.cat([torch.arange(r.start, r.start + r.count) for r in runs])
        assert torch.equal(topk_sorted(text[b, columns][None], VISUAL[b] // 2)[0], kept[b])


def test_hard_equals_the_plain_model_with_the_dropped_columns_masked_as_keys(qwen, mixed, site):
    """Dropping at llm.k == the plain model (its own DeepStack additions, on Qwen3-VL) where, from layer
    k on, each row's dropped visual columns are masked as attention keys: the kept tokens keep their
    rotations and DeepStack features, so the last token's logits agree to float precision."""
    k = int(site.split(".")[1])
    handle = attach(qwen, "fastv", 0.5, site=site)
    with torch.no_grad():
        hard = qwen.forward(**mixed).logits[:, -1]
        kept = kept_of(handle)
    handle.detach()
    layout = qwen.layout(mixed["input_ids"], mixed["attention_mask"])
    keep = mixed["attention_mask"].bool().clone()
    for b, runs in enumerate(layout.runs):
        columns = torch.cat([torch.arange(r.start, r.start + r.count) for r in runs])
        dropped = torch.ones(len(columns), dtype=torch.bool)
        dropped[kept[b]] = False
        keep[b, columns[dropped]] = False

    def masked(_layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        b, length = hidden.shape[:2]
        mask = as_additive(kwargs.get("attention_mask"), b, length, length, hidden.dtype, hidden.device)
        kwargs["attention_mask"] = (mask + log_mask(keep, hidden.dtype)[:, None, None, :]).clamp(
            min=torch.finfo(hidden.dtype).min)
        return args, kwargs

    hooks = [layer.register_forward_pre_hook(masked, with_kwargs=True) for layer in qwen.llm_layers[k:]]
    try:
        with torch.no_grad():
            soft = qwen.forward(**mixed).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)


def test_llm0_then_llmk(qwen, mixed, plain, site):
    """A stage at llm.0 (per image) then one inside the LLM (per row): keep-all is the plain model, and
    the later stage keeps tokens the first kept, named among the row's visual tokens before pruning."""
    with torch.no_grad():
        handle = attach(qwen, [("divprune", "llm.0", 1.0), ("fastv", site, 1.0)])
        assert torch.equal(qwen.forward(**mixed).logits, plain)
        handle.detach()
        handle = attach(qwen, [("divprune", "llm.0", 0.5), ("fastv", site, 0.5)])
        qwen.forward(**mixed)
    handle.detach()
    first = [row[row >= 0] for row in handle.last_kept["divprune@llm.0:0.5"]]  # per image: 8, 3, 8 of 16, 6, 16
    entering = [first[0], torch.cat([first[1], 6 + first[2]])]  # per row, its images in prompt order
    for row, kept in enumerate([row[row >= 0] for row in handle.last_kept[f"fastv@{site}:0.5"]]):
        assert len(kept) == round(len(entering[row]) / 2) and set(kept.tolist()) <= set(entering[row].tolist())


def test_pyramiddrop_with_original_positions_runs_per_row(qwen, mixed, site):
    """A method that needs only LLM signals and keeps positions: PyramidDrop with positions='original'."""
    layers = [1, 2]
    handle = attach(qwen, {"name": "pyramiddrop", "layers": layers, "positions": "original"}, 0.5)
    try:
        with torch.no_grad():
            qwen.forward(**mixed)
        counts = handle.last_counts
        assert list(counts) == [f"pyramiddrop@llm.{k}:0.5" for k in layers]
        assert [len(k) for k in kept_of(handle)] == [8, 11]  # its first stage: half of each row, rounded down
    finally:
        handle.detach()


def test_refused_at_attach_in_one_line(qwen, site):
    requests = [
        ({"method": {"name": "pyramiddrop", "layers": [2]}, "budget": 0.5},
         "pyramiddrop renumbers positions, which is not defined for Qwen-VL's 3-D M-RoPE ids"),
        ({"method": {"name": "sparsevlm", "layers": [2]}, "budget": 64},
         "sparsevlm renumbers positions, which is not defined for Qwen-VL's 3-D M-RoPE ids"),
        ({"method": "fastv", "budget": 0.5, "site": "llm.5"}, "the LLM has 3 decoder layers"),
        ({"method": "cdpruner", "budget": 0.5, "site": site}, "cdpruner needs projector_input"),
    ]
    for request, words in requests:
        with pytest.raises(TokensieveError, match=words) as caught:
            attach(qwen, **request)
        assert "\n" not in str(caught.value)
        assert not qwen.sessions


def test_count_above_a_rows_visual_tokens_is_refused_in_one_line(qwen, mixed, site):
    handle = attach(qwen, "fastv", 20, site=site)
    try:
        with pytest.raises(TokensieveError, match="row 0 holds 16 visual tokens, fewer than the budget of 20") as caught, \
                torch.no_grad():
            qwen.forward(**mixed)
        assert "\n" not in str(caught.value)
    finally:
        handle.detach()
