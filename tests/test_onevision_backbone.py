"""The LLaVA-OneVision adapter on a tiny random model: loading (by model_type too), layouts, exact equality with
the plain model, the kept= path, its chat format, and what it refuses (one line each)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_onevision import ROWS, VOCAB, image, inputs

from tokensieve.attach import attach
from tokensieve.backbones.base import Backbone, Site
from tokensieve.backbones.chat_format import encode_samples, prompt_text
from tokensieve.backbones.hf_llava_onevision import LlavaOnevisionBackbone
from tokensieve.backbones.load import load_backbone
from tokensieve.errors import TokensieveError

SIZES = [size for _, size in ROWS]


def positions(batch):
    return (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)


def test_loads_model_processor_and_contract(onevision, tiny_onevision_dir):
    assert isinstance(onevision, Backbone)
    assert type(onevision.processor.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert onevision.sites() == [Site("llm", k) for k in range(3)]
    assert onevision.signals_at(Site("llm", 0)) == {"projector_input"}
    assert onevision.signals_at(Site("llm", 1)) == {"text_attention", "prev_layer_keys", "normed_states", "positions",
                                                    "layer_text_attention",
                                                    "post_image_attention", "input_image_embeddings"}
    # base 16 + a canvas kept up to 1.21 x 2 crops' tokens (38), below the 3x3 pinpoint's 144
    assert onevision.most_image_tokens() == 16 + 38
    assert type(load_backbone(tiny_onevision_dir)) is LlavaOnevisionBackbone


def test_layouts_describe_the_models_own_runs(onevision, ov_batch):
    with torch.no_grad():
        packed, layouts = onevision.encode_images(ov_batch["pixel_values"], ov_batch["image_sizes"])
    placeholders = (ov_batch["input_ids"] == onevision.image_token_id).sum(1).tolist()  # the processor's count
    assert [len(p) for p in packed] == [len(layout) for layout in layouts] == placeholders == [52, 46, 46]
    assert [layout.resampled_from is not None for layout in layouts] == [False, True, True]
    newline = onevision.model.model.image_newline
    for p, layout in zip(packed, layouts):
        assert torch.equal(p[layout.is_newline], newline.expand(int(layout.is_newline.sum()), -1))


def test_nothing_removed_is_the_plain_model(onevision, ov_batch, ov_plain):
    with torch.no_grad():
        plain = onevision.model(**ov_batch, position_ids=positions(ov_batch)).logits
    assert torch.equal(plain, ov_plain)


def test_nothing_removed_generates_as_the_plain_model(onevision, ov_batch):
    with torch.no_grad():
        plain = onevision.model.generate(**ov_batch, max_new_tokens=3, do_sample=False)
        ours = onevision.generate(**ov_batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(plain[:, ov_batch["input_ids"].shape[1]:], ours)


def test_kept_shrinks_each_run_and_padded_batch_equals_each_row_alone(onevision, ov_batch):
    layouts = [onevision.image_layout(size) for size in ov_batch["image_sizes"].tolist()]
    chosen = [torch.arange(0, 40, 3), torch.arange(5, 41, 2), torch.arange(16)]
    kept = [torch.cat([k, layout.is_newline.nonzero().flatten()]).unique() for k, layout in zip(chosen, layouts)]
    with torch.no_grad():
        prepared = onevision.prepare(**ov_batch, kept=kept)
        assert (prepared.input_ids == onevision.image_token_id).sum(1).tolist() == [len(k) for k in kept]
        together = onevision.forward(**ov_batch, kept=kept).logits[:, -1]
        for b, row in enumerate(ROWS):
            single = onevision.forward(**inputs(onevision.processor, [row], first=b), kept=kept[b:b + 1]).logits
            torch.testing.assert_close(together[b:b + 1], single[:, -1], rtol=1e-5, atol=1e-5)


def test_chat_format_is_the_qwen2_turn(onevision):
    text = prompt_text(onevision, "what colour ?")
    assert text == "<|im_start|>user\n<image>\nwhat colour ?<|im_end|>\n<|im_start|>assistant\n"
    samples = [SimpleNamespace(image=image(size, seed=b), question=q) for b, (q, size) in enumerate(ROWS)]
    encoded = encode_samples(onevision, samples)
    assert torch.equal(encoded["input_ids"], inputs(onevision.processor, ROWS)["input_ids"])
    assert onevision._questions(encoded["input_ids"], onevision.layout(encoded["input_ids"],
                                                                       encoded["attention_mask"]))[1] == \
        "what shape is left and right ?"
    with pytest.raises(TokensieveError, match="LLaVA-OneVision backbone takes exactly one image or video per prompt, not 2"):
        prompt_text(onevision, "what ?", 2)


def test_not_a_onevision_checkpoint(tiny_llava_next_dir):
    with pytest.raises(TokensieveError, match="'llava_next' model; the LLaVA-OneVision backbone needs model_type "
                                              "'llava_onevision'"):
        LlavaOnevisionBackbone.from_pretrained(tiny_llava_next_dir)


def test_bad_inputs_are_one_line(onevision, ov_batch):
    two = dict(ov_batch)
    ids = ov_batch["input_ids"].clone()
    ids[0, -3] = VOCAB["<video>"]  # a video run after row 0's image
    two["input_ids"] = ids
    with pytest.raises(TokensieveError, match="one image or video per prompt for now: row 0 has 2 runs"):
        onevision.forward(**two)
    swapped = dict(ov_batch, image_sizes=ov_batch["image_sizes"].flip(0))
    with pytest.raises(TokensieveError, match="row 0 has 52 <image> tokens for an image of 46 tokens"):
        onevision.forward(**swapped)
    fewer = dict(ov_batch, image_sizes=ov_batch["image_sizes"][:2])
    with pytest.raises(TokensieveError, match="2 images given for 3 prompts with a <image> run"):
        onevision.forward(**fewer)


@pytest.mark.parametrize(("method", "site", "mode", "words"), [
    ("fastervlm", None, "hard", ("fastervlm needs cls_attention, which the LLaVA-OneVision tower .SigLIP. does not "
                                 "have .no CLS token.")),
    ("visionzip", None, "hard", "visionzip needs cls_attention, which the LLaVA-OneVision tower"),
    ("vispruner", None, "hard", "vispruner needs cls_attention"),
    ("prumerge", None, "hard", "prumerge needs last_block_cls_attention"),
    ("hired", None, "hard", "hired needs crop_cls_attention, which the LLaVA-OneVision tower"),
    ("random", "projector", "hard", "LLaVA-OneVision has no projector site: its vision tower runs on crops"),
    ("tome", None, "hard", "LLaVA-OneVision has no vision.0 site"),
    ("sparsevlm", None, "soft", "adds tokens of its own, which soft mode cannot do"),
    ("random", "llm.3", "hard", "llm.3 is past its depth"),
])
def test_refused_at_attach_in_one_line(onevision, method, site, mode, words):
    with pytest.raises(TokensieveError, match=words) as err:
        attach(onevision, method, 0.5 if method != "sparsevlm" else 64, site=site, mode=mode)
    assert "\n" not in str(err.value)
    assert not onevision.sessions


def test_count_above_an_images_tokens_is_refused(onevision, ov_batch):
    handle = attach(onevision, "random", 45, site="llm.0")  # fits the wide image (48), not the square one (41)
    try:
        with pytest.raises(TokensieveError, match="image 1 gives 41 visual tokens .newlines left out., fewer than "
                                                  "the budget of 45"):
            onevision.forward(**ov_batch)
    finally:
        handle.detach()
    with pytest.raises(TokensieveError, match="budget of 55 tokens is larger than the 54"):
        attach(onevision, "random", 55, site="llm.0")
