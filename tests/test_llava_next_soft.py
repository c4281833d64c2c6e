"""``soft`` mode on the LLaVA-NeXT adapter, on the tiny random NeXT with a wide, a square and a tall image
in one batch: every visual token stays in the sequence; ``llm.0`` gives the ones it leaves out (a newline
HiRED drops too) attention mask 0, so positions skip them as in hard mode's shorter prompt, and ``llm.k``
masks them as keys from layer ``k`` on. DESIGN.md's invariants: soft with a binary mask == hard removal,
keep-all == the plain model, detach bit-exact, a padded batch == each row alone, hard mode's budgets and
kept tokens, generate with the cache == without."""

from __future__ import annotations

import pytest
import torch
from test_llava_next_pruning import SUPPRESSED, greedy_without_cache, kept_of
from tiny_llava_next import ROWS, inputs

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError

DART = {"name": "dart", "exact_budget": True}
CASES = {
    "random@llm.0": [("random", "llm.0", 0.5)],
    "divprune@llm.0": [("divprune", "llm.0", 0.5)],
    "hired@llm.0": [("hired", "llm.0", 0.5)],
    "fastv@llm.1": [("fastv", "llm.1", 0.5)],
    "dart@llm.1": [(DART, "llm.1", 0.5)],
    "divprune@llm.0+fastv@llm.2": [("divprune", "llm.0", 0.5), ("fastv", "llm.2", 0.5)],
}


def run(llava_next, stages, batch, mode: str, **kwargs):
    """``(logits (B, L', vocab), attention mask of the LLM input, handle)`` of ``batch`` with ``stages``
    attached in ``mode``, detached after."""
    handle = attach(llava_next, stages, mode=mode)
    try:
        with torch.no_grad():
            mask = llava_next.prepare(**batch).attention_mask
            return llava_next.forward(**batch, **kwargs).logits, mask, handle
    finally:
        handle.detach()


@pytest.mark.parametrize("case", CASES)
def test_soft_with_a_binary_mask_equals_hard_removal(llava_next, next_batch, case):
    """The same tokens kept and counted. With llm.0 alone every column hard mode keeps is compared (soft's
    columns of attention mask 1, in order); inside the LLM the text after the image, which every row keeps."""
    hard, hard_mask, hard_handle = run(llava_next, CASES[case], next_batch, "hard")
    soft, soft_mask, soft_handle = run(llava_next, CASES[case], next_batch, "soft")
    assert soft.shape[1] == next_batch["input_ids"].shape[1]  # every token stays
    assert hard_handle.last_counts == soft_handle.last_counts
    for key, kept in hard_handle.last_kept.items():
        assert torch.equal(kept, soft_handle.last_kept[key])
    if all(site == "llm.0" for _, site, _ in CASES[case]):
        for b in range(len(ROWS)):
            torch.testing.assert_close(soft[b][soft_mask[b].bool()], hard[b][hard_mask[b].bool()],
                                       rtol=1e-5, atol=1e-5)
        assert (soft_mask == 0).sum() > (next_batch["attention_mask"] == 0).sum()  # tokens were masked
    else:
        torch.testing.assert_close(soft[:, -4:], hard[:, -4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("hired")])  # HiRED drops every newline
def test_keep_all_is_the_plain_model_and_detach_restores_it(llava_next, next_batch, next_plain, case):
    keep_all = [(method, site, 1.0) for method, site, _ in CASES[case]]
    logits, _, _ = run(llava_next, keep_all, next_batch, "soft")
    assert torch.equal(logits, next_plain)
    run(llava_next, CASES[case], next_batch, "soft")
    with torch.no_grad():
        assert torch.equal(llava_next.forward(**next_batch).logits, next_plain), "detach restores the model"


@pytest.mark.parametrize("case", CASES)
def test_padded_batch_equals_each_row_alone(llava_next, next_batch, case):
    together, _, handle = run(llava_next, CASES[case], next_batch, "soft")
    kept = kept_of(handle)
    for b, row in enumerate(ROWS):
        single, _, alone = run(llava_next, CASES[case], inputs(llava_next.processor, [row], first=b), "soft")
        torch.testing.assert_close(together[b:b + 1, -1], single[:, -1], rtol=1e-5, atol=1e-5)
        assert torch.equal(kept[b], kept_of(alone)[0])


# Choices that read the image alone, so every decoding step chooses as the prompt did (FastV reads the last
# position's attention, which moves with each new token).
GENERATE = {"random@llm.0": CASES["random@llm.0"], "hired@llm.0": CASES["hired@llm.0"],
            "divprune@llm.0+divprune@llm.2": [("divprune", "llm.0", 0.5), ("divprune", "llm.2", 0.5)]}


@pytest.mark.parametrize("case", GENERATE)
def test_generate_with_cache_equals_steps_without(llava_next, next_batch, case):
    """The masked columns stay in the cache; decoding continues as the whole sequence run again without it."""
    handle = attach(llava_next, GENERATE[case], mode="soft")
    try:
        with torch.no_grad():
            new = llava_next.generate(**next_batch, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESSED)
            steps = greedy_without_cache(llava_next, next_batch, 4)
    finally:
        handle.detach()
    assert torch.equal(new, steps)


def _soft_equals_hard_at_llm0_and_llm1(backbone, batch):
    for stages in ([("divprune", "llm.0", 0.5)], [("fastv", "llm.1", 0.5)]):
        hard, hard_mask, hard_handle = run(backbone, stages, batch, "hard")
        soft, soft_mask, soft_handle = run(backbone, stages, batch, "soft")
        assert hard_handle.last_counts == soft_handle.last_counts
        if stages[0][1] == "llm.0":
            for b in range(len(batch["input_ids"])):
                torch.testing.assert_close(soft[b][soft_mask[b].bool()], hard[b][hard_mask[b].bool()],
                                           rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(soft[:, -3:], hard[:, -3:], rtol=1e-5, atol=1e-5)


def test_soft_equals_hard_on_onevision_images_and_a_video(onevision, ov_batch):
    from test_onevision_video import ROWS as VIDEO_ROWS
    from tiny_onevision import inputs as ov_inputs

    _soft_equals_hard_at_llm0_and_llm1(onevision, ov_batch)  # two of its three images interpolated
    _soft_equals_hard_at_llm0_and_llm1(onevision, ov_inputs(onevision.processor, VIDEO_ROWS))


def test_soft_equals_hard_on_next_video(next_video, nv_batch):
    _soft_equals_hard_at_llm0_and_llm1(next_video, nv_batch)  # a wide image, a video of 4 frames, a tall image


def test_an_order_of_its_own_is_refused_in_soft_mode_in_one_line(onevision):
    from test_onevision_dycoke import clip

    handle = attach(onevision, "dycoke", 0.5, site="llm.0", mode="soft")
    try:
        with pytest.raises(TokensieveError, match="in soft mode every token stays in place") as err:
            onevision.forward(**clip(onevision))
        assert "\n" not in str(err.value)
    finally:
        handle.detach()
