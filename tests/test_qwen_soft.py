"""``soft`` mode on the Qwen-VL adapter, on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: every
visual token stays in the sequence and the dropped ones are masked as attention keys (at ``llm.0`` per
image from decoder layer 0 on, at ``llm.k`` per row from layer ``k`` on). DESIGN.md's invariants: soft
with a binary mask == hard removal, keep-all == the plain model, detach bit-exact, a padded batch == each
row alone, the same budgets and kept tokens as hard, generate with the cache == without."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_qwen import ROWS, kept_of, row_alone

from tokensieve.attach import attach
from tokensieve.backbones.llama_decoder import as_additive
from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs

DART = {"name": "dart", "exact_budget": True}  # keeps the budget exactly (its paper's rule: a multiple of its pivots)
CASES = {
    "random@llm.0": [("random", "llm.0", 0.5)],
    "divprune@llm.0": [("divprune", "llm.0", 0.5)],
    "fastv@llm.1": [("fastv", "llm.1", 0.5)],
    "dart@llm.2": [(DART, "llm.2", 0.5)],
    "divprune@llm.0+fastv@llm.1": [("divprune", "llm.0", 0.5), ("fastv", "llm.1", 0.5)],
}
# Placeholders would read as images, and the end of turn would end a random model's answer at once.
SUPPRESSED = ("image_token_id", "video_token_id")


def suppressed(qwen) -> list[int]:
    return [getattr(qwen.config, name) for name in SUPPRESSED] + [qwen.config.text_config.eos_token_id]


def run(qwen, stages, batch, mode: str, **kwargs):
    """``(logits (B, L', vocab), handle)`` of ``batch`` with ``stages`` attached in ``mode``, detached after."""
    handle = attach(qwen, stages, mode=mode)
    try:
        with torch.no_grad():
            return qwen.forward(**batch, **kwargs).logits, handle
    finally:
        handle.detach()


def kept_columns(qwen, batch, kept: list[torch.Tensor]) -> torch.Tensor:
    """``(B, L)`` True on the real columns of ``batch`` that stay when image ``i`` keeps ``kept[i]``."""
    stays = batch["attention_mask"].bool().clone()
    for b, runs in enumerate(qwen.layout(batch["input_ids"], batch["attention_mask"]).runs):
        for r in runs:
            dropped = torch.ones(r.count, dtype=torch.bool)
            dropped[kept[r.unit]] = False
            stays[b, r.start + dropped.nonzero().flatten()] = False
    return stays


@pytest.mark.parametrize("case", CASES)
def test_soft_with_a_binary_mask_equals_hard_removal(qwen, mixed, case):
    """The same tokens kept and counted; logits agree at every column both keep (llm.0: each row's real
    columns that stay; inside the LLM: the text after the last image, which every row keeps at its end)."""
    hard, hard_handle = run(qwen, CASES[case], mixed, "hard")
    soft, soft_handle = run(qwen, CASES[case], mixed, "soft")
    assert soft.shape[1] == mixed["input_ids"].shape[1]  # every token stayed in the sequence
    assert hard_handle.last_counts == soft_handle.last_counts
    assert hard_handle.last_kept.keys() == soft_handle.last_kept.keys()
    assert all(torch.equal(hard_handle.last_kept[k], soft_handle.last_kept[k]) for k in hard_handle.last_kept)
    if CASES[case][0][1] == "llm.0" and len(CASES[case]) == 1:
        stays = kept_columns(qwen, mixed, kept_of(soft_handle))
        hard_real = (hard.new_ones(hard.shape[:2]).cumsum(1) > hard.shape[1] - stays.sum(1, keepdim=True))
        torch.testing.assert_close(soft[stays], hard[hard_real], rtol=1e-5, atol=1e-5)
    text = int(qwen.layout(mixed["input_ids"], mixed["attention_mask"]).question_mask.sum(1).min())
    torch.testing.assert_close(soft[:, -text:], hard[:, -text:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["divprune@llm.0", "fastv@llm.1", "divprune@llm.0+fastv@llm.1"])
def test_soft_answers_as_hard(qwen, mixed, case):
    answers = {}
    for mode in ("hard", "soft"):
        handle = attach(qwen, CASES[case], mode=mode)
        try:
            with torch.no_grad():
                answers[mode] = qwen.generate(**mixed, max_new_tokens=4, do_sample=False,
                                              suppress_tokens=suppressed(qwen))
        finally:
            handle.detach()
    assert torch.equal(answers["hard"], answers["soft"])


def _hooks(model) -> set:
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, hooks in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in hooks}


@pytest.mark.parametrize("case", CASES)
def test_keep_all_is_the_plain_model_and_detach_restores_it(qwen, mixed, plain, case):
    hooks = _hooks(qwen.model)
    kept_all = [(method, site, 1.0) for method, site, _ in CASES[case]]
    logits, _ = run(qwen, kept_all, mixed, "soft")
    assert torch.equal(logits, plain), "keep-all soft is the plain model bit for bit"
    handle = attach(qwen, CASES[case], mode="soft")
    with torch.no_grad():
        pruned = qwen.forward(**mixed).logits
        with handle.disabled():
            assert torch.equal(qwen.forward(**mixed).logits, plain)
    handle.detach()
    assert not torch.allclose(pruned, plain)
    with torch.no_grad():
        assert torch.equal(qwen.forward(**mixed).logits, plain), "detach restores the model bit for bit"
    assert _hooks(qwen.model) == hooks and not qwen.sessions


@pytest.mark.parametrize("case", CASES)
def test_padded_batch_equals_each_row_alone(qwen, mixed, case):
    together, handle = run(qwen, CASES[case], mixed, "soft")
    kept = kept_of(handle)
    for b in range(len(ROWS)):
        alone = row_alone(qwen, mixed, b)
        single, handle = run(qwen, CASES[case], alone, "soft")
        torch.testing.assert_close(together[b: b + 1, -1], single[:, -1], rtol=1e-5, atol=1e-5)
        rows = ([0] if b == 0 else [1, 2]) if CASES[case][0][1] == "llm.0" else [b]  # images at llm.0
        assert all(torch.equal(kept[i], k) for i, k in zip(rows, kept_of(handle)))


def test_budgets_are_those_of_hard_mode(qwen, mixed):
    _, handle = run(qwen, [("divprune", "llm.0", 5), ("fastv", "llm.1", 0.5)], mixed, "soft")
    # Rounded means: llm.0 keeps 5 of each image's 16, 6, 16 tokens; llm.1 half of each row's 5 and 10 (2, 5).
    assert handle.last_counts == {"divprune@llm.0:5": (13, 5), "fastv@llm.1:0.5": (8, 4)}
    assert [len(k) for k in kept_of(handle)] == [5, 5, 5]
    assert [int((row >= 0).sum()) for row in handle.last_kept["fastv@llm.1:0.5"]] == [2, 5]


@pytest.mark.parametrize(("method", "site"), [("random", "llm.0"), ("divprune", "llm.1")])
def test_generate_with_cache_equals_steps_without(qwen, mixed, method, site):
    """The cache holds every column; the dropped ones stay masked as keys while decoding. These methods
    choose from the visual tokens alone, which later tokens cannot change (causal)."""
    handle = attach(qwen, method, 0.5, site=site, mode="soft")
    try:
        with torch.no_grad():
            new = qwen.generate(**mixed, max_new_tokens=4, do_sample=False, suppress_tokens=suppressed(qwen))
            ids, mask = mixed["input_ids"], mixed["attention_mask"]
            for _ in range(4):
                step = dict(mixed, input_ids=ids, attention_mask=mask, mm_token_type_ids=None)
                logits = qwen.forward(**step, use_cache=False).logits[:, -1]
                token = logits.index_fill(1, torch.tensor(suppressed(qwen)), -torch.inf).argmax(-1, keepdim=True)
                ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    finally:
        handle.detach()
    assert torch.equal(new, ids[:, mixed["input_ids"].shape[1]:])


@dataclass
class Weighted(Method):
    """Keeps every token, weighted as keys by ``weight`` on every other one (test only)."""

    name = "weighted"
    stages = ("llm",)
    weight: torch.Tensor | None = None

    def select(self, inputs: SiteInputs) -> Selection:
        b, n = inputs.tokens.shape[:2]
        even = (torch.arange(n) % 2 == 0).expand(b, n)
        return Selection(torch.arange(n).expand(b, n), key_mask=torch.where(even, self.weight, 1.0))


@pytest.mark.parametrize("site", ["llm.0", "llm.1"])
def test_a_key_mask_weights_the_visual_keys_and_passes_gradients(qwen, mixed, site):
    """Every other visual token (of each image at llm.0, of each row inside the LLM) weighted ``w`` as a key
    from the stage's layer on == the plain model with ``log w`` added to those key columns; the gradient
    reaches ``w``."""
    weight = torch.tensor(0.3, requires_grad=True)
    handle = attach(qwen, Weighted(weight=weight), 1.0, site=site, mode="soft")
    try:
        soft = qwen.forward(**mixed).logits[:, -1]
    finally:
        handle.detach()
    soft.logsumexp(-1).sum().backward()
    assert weight.grad is not None and weight.grad.abs() > 0
    layout = qwen.layout(mixed["input_ids"], mixed["attention_mask"])
    bias = torch.zeros(mixed["input_ids"].shape)
    for b, runs in enumerate(layout.runs):
        columns = [torch.arange(r.start, r.start + r.count) for r in runs]
        for part in columns if site == "llm.0" else [torch.cat(columns)]:
            bias[b, part[::2]] = torch.log(torch.tensor(1e-6 + (1 - 1e-6) * 0.3))

    def weighted(_layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        b, length = hidden.shape[:2]
        mask = as_additive(kwargs.get("attention_mask"), b, length, length, hidden.dtype, hidden.device)
        kwargs["attention_mask"] = mask + bias[:, None, None, :]
        return args, kwargs

    first = int(site.split(".")[1])
    hooks = [layer.register_forward_pre_hook(weighted, with_kwargs=True) for layer in qwen.llm_layers[first:]]
    try:
        with torch.no_grad():
            expected = qwen.forward(**mixed).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(soft.detach(), expected, rtol=1e-5, atol=1e-5)


def test_deepstack_additions_are_the_plain_models(qwen, mixed):
    """Qwen3-VL: in soft mode every column stays, so the model adds its DeepStack features itself, to
    every visual column, as unpruned: after layer ``j`` the hidden states are the layer's output plus
    level ``j``'s features of the row's images (the session adds nothing)."""
    if not qwen.deepstack_levels:
        pytest.skip("DeepStack is Qwen3-VL's")
    outputs, entering = {}, {}  # layer j's output, and what enters layer j + 1 (DeepStack level j added)
    hooks = [qwen.llm_layers[j].register_forward_hook(lambda _m, _a, out, j=j: outputs.__setitem__(j, out))
             for j in range(qwen.deepstack_levels)]
    hooks += [qwen.llm_layers[j + 1].register_forward_pre_hook(lambda _m, args, j=j: entering.__setitem__(j, args[0]))
              for j in range(qwen.deepstack_levels)]
    handle = attach(qwen, [("divprune", "llm.0", 0.5), ("fastv", "llm.1", 0.5)], mode="soft")
    try:
        assert not qwen.sessions[0].adds_deepstack
        with torch.no_grad():
            qwen.forward(**mixed)
            levels = qwen.encode_images(mixed["pixel_values"], mixed["image_grid_thw"]).deepstack_features
    finally:
        handle.detach()
        for hook in hooks:
            hook.remove()
    visual = mixed["input_ids"] == qwen.image_token_id
    for j in range(qwen.deepstack_levels):
        added = (entering[j] - outputs[j])[visual]  # (visual columns of the batch, d)
        torch.testing.assert_close(added, torch.cat(levels[j]), rtol=0, atol=1e-5)


@dataclass
class OwnOrder(Method):
    name = "own_order"

    def select(self, inputs: SiteInputs) -> Selection:
        idx = torch.arange(inputs.keep)[None]
        return Selection(idx, order=idx.flip(1))


@dataclass
class MakesTokens(Method):
    name = "makes_tokens"
    makes_extra_tokens = True


@pytest.mark.parametrize(("request_", "words"), [
    ({"method": {"name": "pyramiddrop", "layers": [2]}, "budget": 0.5}, "pyramiddrop renumbers positions"),
    ({"method": MakesTokens(), "budget": 0.5, "site": "llm.0"}, "makes_tokens adds tokens of its own"),
    ({"method": "fastv", "budget": 0.5, "site": "llm.0"}, "fastv needs text_attention"),
])
def test_refused_at_attach_in_one_line(qwen, request_, words):
    with pytest.raises(TokensieveError, match=words) as caught:
        attach(qwen, **request_, mode="soft")
    assert "\n" not in str(caught.value)
    assert not qwen.sessions


def test_an_order_of_its_own_is_refused_in_one_line(qwen, mixed):
    handle = attach(qwen, OwnOrder(), 0.5, site="llm.0", mode="soft")
    try:
        with pytest.raises(TokensieveError, match="an order of its own is not supported") as caught, torch.no_grad():
            qwen.forward(**mixed)
        assert "\n" not in str(caught.value)
    finally:
        handle.detach()
