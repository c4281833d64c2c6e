"""The engine's invariants (DESIGN.md), checked for every registered method at every stage it
supports, on a tiny LLaVA on the CPU. A new method joins these tests by being registered."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from padding_side import right_padded
from tiny_clip_text import save_tiny_clip

from tokensieve.attach import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.llava_prompt import encode
from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, Method, Selection, SiteInputs
from tokensieve.methods import create_method, list_methods, method_class

SITE_OF_STAGE = {"vision": "vision.1", "projector": "projector", "llm": "llm.1"}
BUDGET = 16  # of the tiny model's 64 visual tokens
# Every method at one site of each stage it acts at, and at its default site (its paper's) when
# that is llm.0, the LLM's input embeddings.
CASES = [(name, SITE_OF_STAGE[stage]) for name in list_methods() for stage in method_class(name).stages]
CASES += [(name, "llm.0") for name in list_methods() if method_class(name).default_site == "llm.0"]
# Sites inside a method's stages that its paper's rule cannot use, refused when attaching.
REFUSED = {("cdpruner", "llm.1"): "cdpruner needs projector_input, which llm.1 does not provide",
           ("tome", "projector"): "merges inside the vision tower's blocks",
           # HiRED's per-crop signals exist only on an anyres model (LLaVA-NeXT)
           **{("hired", site): f"hired needs anyres_source, crop_cls_attention, first_block_crop_cls_attention, "
              f"which {site} does not provide" for site in ("llm.0", "llm.1")},
           # DyCoke compares a video's frames; LLaVA-1.5 takes images only
           **{("dycoke", site): "dycoke prunes videos only" for site in ("llm.0", "llm.1")}}
CASES = [case for case in CASES if case not in REFUSED]


@pytest.fixture(scope="module")
def backbone(tiny_llava_dir):
    return LlavaBackbone.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """Method name -> an instance configured for the tiny model: the defaults, except what a method
    cannot do without (CDPruner's CLIP text encoder, here a tiny one as wide as the tiny tower)."""
    clip = save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), width=32)
    needs = {"cdpruner": {"text_encoder": str(clip)}, "pyramiddrop": {"layers": (1, 2)},
             "sparsevlm": {"layers": (1, 2), "scale": 9.0, "bias": 6.0}}
    return lambda name: create_method(name, **needs.get(name, {}))


def adds_tokens(method, site: str) -> bool:
    """True where a method's paper adds a token of its own to the image run (VisionZip's CLS)."""
    return method.makes_extra_tokens and site in ("projector", "llm.0")


def hard_only(method, site: str) -> bool:
    """True where soft mode cannot express the paper's method: tokens of its own, positions
    renumbered after a drop (PyramidDrop), or merging inside the tower's blocks (ToMe)."""
    return (adds_tokens(method, site) or getattr(method, "renumbers_positions", False)
            or getattr(method, "merges_in_blocks", False))


def adaptive(method) -> bool:
    """True for a method whose paper sets the count itself, ignoring the budget (SparseVLM's rank)."""
    return method.count_per_row and all(b.ratio == 1.0 for _, b in method.schedule("llm", Budget(count=16), 3))


def budget(method, count: int):
    """``count`` of the 64 tokens, as the method takes its budget: a share for one whose budget is
    the share each of its stages keeps (PyramidDrop's lambda)."""
    return count / 64 if method.budget_is_share else count


@pytest.fixture(scope="module")
def batch(backbone, tiny_samples):
    encoded = encode(backbone.processor, tiny_samples)
    assert (encoded["attention_mask"] == 0).any(), "the batch must be padded"
    return encoded


def last_logits(backbone, batch) -> torch.Tensor:
    return backbone.forward(**batch, logits_to_keep=1).logits[:, -1]


@pytest.mark.parametrize("name,site", CASES)
def test_keep_all_reproduces_unpruned_logits(backbone, batch, name, site, make):
    plain = last_logits(backbone, batch)
    handle = attach(backbone, make(name), budget(make(name), 64), site=site, mode="hard")
    try:
        kept_all = last_logits(backbone, batch)
    finally:
        handle.detach()
    if adds_tokens(make(name), site):  # a token of its own takes a slot: no budget is the unpruned model
        (kept,) = handle.last_kept.values()
        assert kept.shape[1] == 64 and bool((kept == -3).any(1).all())
        return
    if adaptive(make(name)):  # its paper's count ignores the budget (SparseVLM caps it at all but one)
        assert all(after <= before for before, after in handle.last_counts.values())
        return
    assert torch.equal(plain, kept_all)


@pytest.mark.parametrize("name,site", CASES)
def test_budget_met_and_pruning_changes_the_answer_distribution(backbone, batch, name, site, make):
    plain = last_logits(backbone, batch)
    handle = attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode="hard")
    try:
        pruned = last_logits(backbone, batch)
    finally:
        handle.detach()
    assert len(handle.last_counts) == len(handle.stages)  # one count per stage (a schedule has several)
    if adaptive(make(name)):  # each stage keeps what the rule says (a full-rank stage keeps all)
        counts = list(handle.last_counts.values())
        assert all(after <= before for before, after in counts) and any(after < before for before, after in counts)
    else:
        assert handle.last_counts[str(handle.stages[0])] == (64, make(name).kept_count(64, BUDGET))
    assert not torch.allclose(plain, pruned)


@pytest.mark.parametrize("name,site", CASES)
def test_soft_binary_mask_equals_hard_removal(backbone, batch, name, site, make):
    if hard_only(make(name), site):
        with pytest.raises(TokensieveError, match="soft mode cannot"):
            attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode="soft")
        return
    results = {}
    for mode in ("hard", "soft"):
        handle = attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode=mode)
        try:
            results[mode] = last_logits(backbone, batch)
        finally:
            handle.detach()
    torch.testing.assert_close(results["soft"], results["hard"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,site", CASES)
def test_detach_restores_the_model_bit_for_bit(backbone, batch, name, site, make):
    before_state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    plain = last_logits(backbone, batch)
    hooks = _hooks(backbone)
    handle = attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode="hard")
    assert _hooks(backbone) > hooks
    handle.detach()
    assert torch.equal(plain, last_logits(backbone, batch))
    assert all(torch.equal(v, before_state[k]) for k, v in backbone.model.state_dict().items())
    assert _hooks(backbone) == hooks


def _hooks(backbone) -> set:
    """Every forward (pre-)hook on the model, as (module, kind, hook id)."""
    return {(name, kind, key) for name, m in backbone.model.named_modules()
            for kind, hooks in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in hooks}


@pytest.mark.parametrize("name,site", CASES)
def test_batch_equals_each_sample_alone(backbone, tiny_samples, name, site, make):
    handle = attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode="hard")
    try:
        together = last_logits(backbone, encode(backbone.processor, tiny_samples))
        alone = torch.cat([last_logits(backbone, encode(backbone.processor, [s])) for s in tiny_samples])
    finally:
        handle.detach()
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,site", CASES)
def test_a_batch_padded_on_the_right_gives_what_it_gives_padded_on_the_left(backbone, batch, name, site, make):
    handle = attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode="hard")
    try:
        left, left_kept = last_logits(backbone, batch), dict(handle.last_kept)
        right = last_logits(backbone, right_padded(batch))
    finally:
        handle.detach()
    torch.testing.assert_close(right, left, atol=2e-5, rtol=1e-5)
    assert all(torch.equal(handle.last_kept[stage], kept) for stage, kept in left_kept.items())


@pytest.mark.parametrize("name,site", CASES)
def test_cached_greedy_decoding_equals_recomputing(backbone, batch, name, site, make):
    handle = attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode="hard")
    try:
        runs = [backbone.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=cache,
                                  output_scores=True, return_dict_in_generate=True) for cache in (True, False)]
    finally:
        handle.detach()
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for with_cache, without in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(with_cache, without, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,site", CASES)
def test_kept_patches_are_recorded_alike_in_hard_and_soft_mode(backbone, batch, name, site, make):
    if hard_only(make(name), site):
        return  # refused in soft mode: test_soft_binary_mask_equals_hard_removal
    kept = {}
    for mode in ("hard", "soft"):
        handle = attach(backbone, make(name), budget(make(name), BUDGET), site=site, mode=mode)
        try:
            backbone.forward(**batch)
        finally:
            handle.detach()
        (kept[mode],) = handle.last_kept.values()
    assert torch.equal(kept["hard"], kept["soft"])
    assert kept["hard"].shape == (batch["input_ids"].shape[0], make(name).kept_count(64, BUDGET))
    assert all(row.tolist() == sorted(set(row.tolist())) and 0 <= row.min() and row.max() < 64 for row in kept["hard"])


def test_kept_patches_are_the_tokens_the_llm_receives(backbone, batch):
    handle = attach(backbone, "random", BUDGET, site="projector")
    try:
        pruned = last_logits(backbone, batch)
    finally:
        handle.detach()
    (kept,) = handle.last_kept.values()
    assert torch.equal(pruned, backbone.forward(**batch, kept=list(kept), logits_to_keep=1).logits[:, -1])


def test_kept_patches_of_later_stages_are_among_the_earlier_ones(backbone, batch):
    handle = attach(backbone, [("random", "vision.1", 48), ("random", "projector", 32), ("fastv", "llm.1", 8)])
    try:
        backbone.forward(**batch)
    finally:
        handle.detach()
    tower, projector, llm = handle.last_kept.values()
    for a, b, c in zip(tower.tolist(), projector.tolist(), llm.tolist()):
        assert set(c) < set(b) < set(a) and (len(a), len(b), len(c)) == (48, 32, 8)


def test_disabled_runs_the_unpruned_model(backbone, batch):
    plain = last_logits(backbone, batch)
    handle = attach(backbone, "random", BUDGET, site="llm.1")
    try:
        with handle.disabled():
            assert torch.equal(plain, last_logits(backbone, batch))
        assert not torch.allclose(plain, last_logits(backbone, batch))
    finally:
        handle.detach()


def test_stages_at_several_sites_compose(backbone, batch):
    handle = attach(backbone, [("random", "vision.1", 48), ("random", "projector", 32), ("random", "llm.1", 8)])
    try:
        backbone.forward(**batch)
    finally:
        handle.detach()
    assert list(handle.last_counts.values()) == [(64, 48), (48, 32), (32, 8)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="random", budget=65, site="projector"), "larger than the 64 visual tokens"),
    (dict(method="nonesuch", budget=8), "unknown method 'nonesuch'"),
    (dict(method={"name": "random", "colour": 1}, budget=8), "unknown parameter(s) colour"),
    (dict(method="random", budget=8, site="llm.9"), "llm.9 is past its depth"),
    (dict(method="random", budget=8, mode="fuzzy"), "unknown mode 'fuzzy'"),
    (dict(method="random", budget="lots"), "cannot read budget 'lots'"),
    (dict(method={"name": "anchor", "top_m": 60}, budget=70, site="vision.1"), "larger than the 64"),
    (dict(method={"name": "anchor", "top_m": 60}, budget=64, site="vision.1"), "k_anchors + top_m + 1 > tokens"),
    (dict(method=[("random", "projector", 32), ("random", "llm.1", 40)]), "budget of 40 tokens is larger than the 32"),
])
def test_bad_requests_are_refused_when_attaching(backbone, kwargs, message):
    """Before any model work: attach itself raises, with a message naming the value."""
    hooks = _hooks(backbone)
    with pytest.raises(TokensieveError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        attach(backbone, **kwargs)
    assert _hooks(backbone) == hooks


@pytest.mark.parametrize("case,message", REFUSED.items())
def test_sites_a_method_cannot_use_are_refused_when_attaching(backbone, make, case, message):
    name, site = case
    with pytest.raises(TokensieveError, match=message):
        attach(backbone, make(name), budget(make(name), BUDGET), site=site)


@pytest.mark.parametrize("name", [name for name, site in CASES if site == "vision.1"
                                  and not getattr(create_method(name), "merges_in_blocks", False)])
def test_cls_is_kept_in_the_tower(backbone, batch, name, make):
    """Hooks run in registration order, so one added after attach sees the pruned block input."""
    seen = []

    def grab(_module, args):
        seen.append(args[0])

    plain_hook = backbone.vision_layers[1].register_forward_pre_hook(grab)
    backbone.forward(**batch)
    plain_hook.remove()
    handle = attach(backbone, make(name), budget(make(name), BUDGET), site="vision.1")
    pruned_hook = backbone.vision_layers[1].register_forward_pre_hook(grab)
    try:
        backbone.forward(**batch)
    finally:
        pruned_hook.remove()
        handle.detach()
    plain, pruned = seen
    assert pruned.shape[1] == 1 + BUDGET
    assert torch.equal(pruned[:, 0], plain[:, 0])


@dataclass
class _RecordTextAttention(Method):
    """Keeps the first tokens and remembers the text-attention signal it was given."""

    name = "record_text_attention"
    stages = ("llm",)
    signals = ("text_attention",)

    def select(self, inputs: SiteInputs) -> Selection:
        self.seen = inputs.signal("text_attention")
        return Selection(torch.arange(inputs.keep).expand(inputs.tokens.shape[0], -1))


def test_text_attention_signal_equals_eager_attention(tiny_llava_dir, tiny_samples):
    """The last token's attention, recomputed with SDPA on, equals eager attention's weights."""
    eager = LlavaBackbone.from_pretrained(tiny_llava_dir)
    eager.model.set_attn_implementation("eager")
    batch = encode(eager.processor, tiny_samples)
    inputs = eager.prepare(**batch)
    weights = eager.model(**inputs.model_kwargs(), output_attentions=True).attentions[0]  # layer 0
    layout = eager.layout(inputs.input_ids, inputs.attention_mask)
    columns = layout.image_start[:, None] + torch.arange(64)
    expected = weights[:, :, -1].mean(1).gather(1, columns)  # (B, 64)

    sdpa = LlavaBackbone.from_pretrained(tiny_llava_dir)
    recorder = _RecordTextAttention()
    handle = attach(sdpa, recorder, 64, site="llm.1")
    try:
        sdpa.forward(**batch)
    finally:
        handle.detach()
    torch.testing.assert_close(recorder.seen, expected, atol=1e-6, rtol=1e-5)
