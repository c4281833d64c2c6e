"""The LLaVA-NeXT adapter on a tiny random model: loading, layouts, exact equality with the plain model,
the kept= path, and what it refuses (one line each)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_llava_next import NEWLINES, ROWS, TOKENS, inputs

from tokensieve.attach import attach
from tokensieve.backbones.base import Backbone, Site
from tokensieve.backbones.hf_llava_next import LlavaNextBackbone
from tokensieve.errors import TokensieveError
from tokensieve.method import Method

SIZES = [size for _, size in ROWS]


@dataclass
class MakesTokens(Method):
    name = "makes_tokens"
    makes_extra_tokens = True


def positions(batch):
    return (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)


def with_newlines(llava_next, batch, kept):
    """Per image, ``kept`` (positions in its packed run) and every newline of the run, increasing."""
    layouts = [llava_next.image_layout(size) for size in batch["image_sizes"].tolist()]
    return [torch.cat([k, layout.is_newline.nonzero().flatten()]).unique() for k, layout in zip(kept, layouts)]


def test_loads_model_processor_and_contract(llava_next):
    assert isinstance(llava_next, Backbone)
    assert type(llava_next.processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert llava_next.sites() == [Site("llm", k) for k in range(3)]
    assert llava_next.signals_at(Site("llm", 0)) == {"projector_input", "crop_cls_attention",
                                                     "first_block_crop_cls_attention", "anyres_source"}
    assert llava_next.most_image_tokens() == 16 + 64  # base + the 56x56 pinpoint's 2x2 crops


def test_layouts_describe_the_models_own_runs(llava_next, next_batch):
    with torch.no_grad():
        packed, layouts = llava_next.encode_images(next_batch["pixel_values"], next_batch["image_sizes"])
    assert [len(p) for p in packed] == [len(layout) for layout in layouts] == [TOKENS[s] for s in SIZES]
    newline = llava_next.model.model.image_newline
    for p, layout, size in zip(packed, layouts, SIZES):
        assert int(layout.is_newline.sum()) == NEWLINES[size]
        assert torch.equal(p[layout.is_newline], newline.expand(NEWLINES[size], -1))
    placeholders = (next_batch["input_ids"] == llava_next.image_token_id).sum(1)
    assert placeholders.tolist() == [TOKENS[s] for s in SIZES]


def test_nothing_removed_is_the_plain_model(llava_next, next_batch, next_plain):
    with torch.no_grad():
        plain = llava_next.model(**next_batch, position_ids=positions(next_batch)).logits
    assert torch.equal(plain, next_plain)


def test_nothing_removed_generates_as_the_plain_model(llava_next, next_batch):
    with torch.no_grad():
        plain = llava_next.model.generate(**next_batch, max_new_tokens=3, do_sample=False)
        ours = llava_next.generate(**next_batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(plain[:, next_batch["input_ids"].shape[1]:], ours)


def test_kept_shrinks_each_run_and_padded_batch_equals_each_row_alone(llava_next, next_batch):
    kept = with_newlines(llava_next, next_batch, [torch.arange(0, 40, 3), torch.arange(5, 60, 2), torch.arange(16)])
    with torch.no_grad():
        prepared = llava_next.prepare(**next_batch, kept=kept)
        runs = (prepared.input_ids == llava_next.image_token_id).sum(1)
        assert runs.tolist() == [len(k) for k in kept]
        together = llava_next.forward(**next_batch, kept=kept).logits[:, -1]
        for b, row in enumerate(ROWS):
            single = llava_next.forward(**inputs(llava_next.processor, [row], first=b), kept=kept[b:b + 1]).logits
            torch.testing.assert_close(together[b:b + 1], single[:, -1], rtol=1e-5, atol=1e-5)


def test_not_a_llava_next_checkpoint(tiny_llava_dir):
    with pytest.raises(TokensieveError, match="'llava' model; the LLaVA-NeXT backbone needs model_type 'llava_next'"):
        LlavaNextBackbone.from_pretrained(tiny_llava_dir)


def test_bad_inputs_are_one_line(llava_next, next_batch):
    two = dict(next_batch)
    ids = next_batch["input_ids"].clone()
    ids[0, -3] = llava_next.image_token_id  # a second run in row 0
    two["input_ids"] = ids
    with pytest.raises(TokensieveError, match="one image per prompt for now: row 0 has 2 runs"):
        llava_next.forward(**two)
    swapped = dict(next_batch, image_sizes=next_batch["image_sizes"].flip(0))
    with pytest.raises(TokensieveError, match="row 0 has 52 <image> tokens for an image of 56 tokens"):
        llava_next.forward(**swapped)
    handle = attach(llava_next, "random", 0.5, site="llm.0")
    try:
        with pytest.raises(TokensieveError, match="kept= and an attached pruning handle"):
            llava_next.forward(**next_batch, kept=[torch.arange(4)] * 3)
    finally:
        handle.detach()


@pytest.mark.parametrize(("method", "budget", "site", "mode", "words"), [
    ("visionzip", 0.5, None, "hard", "LLaVA-NeXT has no projector site: its vision tower runs on crops"),
    ("fastervlm", 0.5, "vision.1", "hard", "LLaVA-NeXT has no vision.1 site"),
    ("sparsevlm", 64, None, "soft", "sparsevlm adds tokens of its own, which soft mode cannot do"),
    (MakesTokens(), 0.5, "llm.0", "hard", "adds tokens of its own, which the LLaVA-NeXT backbone places inside the "
                                          "LLM only"),
    ("pyramiddrop", 0.5, None, "soft", "renumbers positions after a drop, which soft mode cannot do"),
    ("random", 0.5, "llm.3", "hard", "llm.3 is past its depth"),
])
def test_refused_at_attach_in_one_line(llava_next, method, budget, site, mode, words):
    with pytest.raises(TokensieveError, match=words) as err:
        attach(llava_next, method, budget, site=site, mode=mode)
    assert "\n" not in str(err.value)
    assert not llava_next.sessions


def test_count_above_an_images_tokens_is_refused(llava_next, next_batch):
    handle = attach(llava_next, "random", 60, site="llm.0")  # fits the largest image (80), not the wide one (48)
    try:
        with pytest.raises(TokensieveError, match="image 0 gives 48 visual tokens .newlines left out., fewer than "
                                                  "the budget of 60"):
            llava_next.forward(**next_batch)
    finally:
        handle.detach()
    with pytest.raises(TokensieveError, match="budget of 81 tokens is larger than the 80"):
        attach(llava_next, "random", 81, site="llm.0")


def test_missing_and_corrupt_weights_are_one_line(tmp_path, tiny_llava_next_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    missing = shutil.copytree(tiny_llava_next_dir, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "image_newline" not in k}, missing / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(TokensieveError, match="1 of the model's weights are not in its checkpoint, e.g. .*image_newline"):
        LlavaNextBackbone.from_pretrained(missing)
    broken = shutil.copytree(tiny_llava_next_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TokensieveError, match="cannot load the weights") as caught:
        LlavaNextBackbone.from_pretrained(broken)
    assert "\n" not in str(caught.value)
