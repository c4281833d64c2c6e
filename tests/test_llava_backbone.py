"""The LLaVA adapter: loading, sites, layout, and exact equality with the plain model."""

from __future__ import annotations

import pytest
import torch

from tokensieve.backbones import LlavaBackbone, Site
from tokensieve.backbones.llava_prompt import encode
from tokensieve.errors import TokensieveError


def test_loads_through_from_pretrained_with_processor(backbone):
    assert backbone.processor is not None
    assert backbone.n_visual_tokens == 64


def test_nothing_removed_gives_plain_logits_single_sample(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:1])
    plain = backbone.model(**batch).logits
    ours = backbone.forward(**batch).logits
    assert torch.equal(plain, ours)


def test_nothing_removed_gives_plain_logits_padded_batch(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples)
    assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    plain = backbone.model(**batch, position_ids=positions).logits
    ours = backbone.forward(**batch).logits
    assert torch.equal(plain, ours)


@pytest.mark.parametrize("n", [1, 6])
def test_nothing_removed_gives_plain_generate(backbone, tiny_samples, n):
    batch = encode(backbone.processor, tiny_samples[:n])
    plain = backbone.model.generate(**batch, max_new_tokens=4, do_sample=False)
    ours = backbone.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain[:, batch["input_ids"].shape[1]:], ours)


def test_one_vision_tower_pass(backbone, tiny_samples):
    calls = []
    handle = backbone.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        backbone.forward(**encode(backbone.processor, tiny_samples[:2]))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_features_follow_feature_layer_and_strategy(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:2])
    hidden = backbone.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    expected = backbone.projector(hidden[backbone.config.vision_feature_layer][:, 1:])  # CLS dropped
    assert torch.equal(backbone.encode_images(batch["pixel_values"]), expected)


def test_layout_finds_image_run_and_question(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples)
    layout = backbone.layout(batch["input_ids"], batch["attention_mask"])
    assert layout.image_count.tolist() == [64] * len(tiny_samples)
    tok = backbone.processor.tokenizer
    for b, sample in enumerate(tiny_samples):
        question = tok.convert_ids_to_tokens(batch["input_ids"][b][layout.question_mask[b]].tolist())
        assert question == tok.tokenize(sample.question) + ["ASSISTANT", ":"]
        assert batch["input_ids"][b, layout.image_start[b] - 1] == tok.convert_tokens_to_ids(":")


def test_kept_subset_equals_sample_alone(backbone, tiny_samples):
    """Rows keeping different numbers of tokens in one padded batch = each row alone."""
    batch = encode(backbone.processor, tiny_samples[:3])
    kept = [torch.tensor([0, 5, 7]), torch.arange(64), torch.tensor([3, 60])]
    together = backbone.forward(**batch, kept=kept).logits[:, -1]
    for b in range(3):
        alone = encode(backbone.processor, tiny_samples[b : b + 1])
        single = backbone.forward(**alone, kept=[kept[b]]).logits[:, -1]
        torch.testing.assert_close(together[b : b + 1], single, rtol=1e-5, atol=1e-5)


def test_kept_subset_shrinks_the_sequence(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:1])
    inputs = backbone.prepare(**batch, kept=[torch.tensor([1, 2, 3, 4])])
    assert inputs.inputs_embeds.shape[1] == batch["input_ids"].shape[1] - 60
    assert (inputs.input_ids == backbone.image_token_id).sum() == 4


def test_sites(backbone):
    names = [str(s) for s in backbone.sites()]
    # 3 vision layers, features from the last: blocks 1 and 2 can be pruned before; llm.0 is the
    # projector's output, the LLM's input embeddings of the image.
    assert names == ["vision.1", "vision.2", "projector", "llm.0", "llm.1", "llm.2"]
    assert backbone.site_module(Site.parse("llm.2")) is backbone.llm_layers[2]
    assert backbone.site_module(Site.parse("llm.0")) is backbone.projector
    assert backbone.prefix_tokens(Site.parse("llm.0")) == 0
    assert backbone.prefix_tokens(Site.parse("vision.1")) == 1
    assert backbone.prefix_tokens(Site.parse("projector")) == 0
    with pytest.raises(TokensieveError, match="llm.7"):
        backbone.site_module(Site.parse("llm.7"))
    with pytest.raises(TokensieveError, match="unknown site"):
        Site.parse("decoder.3")


def test_cls_attention_matches_eager_attention(backbone, tiny_samples):
    pixels = encode(backbone.processor, tiny_samples[:2])["pixel_values"]
    with backbone.capture_cls_attention(-1) as captured:
        backbone.encode_images(pixels)
    eager = backbone.vision_tower.config._attn_implementation
    backbone.vision_tower.set_attn_implementation("eager")
    try:
        attentions = backbone.vision_tower(pixels, output_attentions=True).attentions
    finally:
        backbone.vision_tower.set_attn_implementation(eager)
    expected = attentions[-1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(captured[0], expected, rtol=1e-5, atol=1e-6)


def test_not_a_llava_checkpoint(tmp_path, tiny_llava_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=16, patch_size=8)).save_pretrained(tmp_path / "clip")
    with pytest.raises(TokensieveError, match="'clip_vision_model' model"):
        LlavaBackbone.from_pretrained(tmp_path / "clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokensieveError, match="no config.json"):
        LlavaBackbone.from_pretrained(tmp_path / "empty")


def test_corrupt_weights(tmp_path, tiny_llava_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llava_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TokensieveError, match="cannot load the weights"):
        LlavaBackbone.from_pretrained(broken)


def test_split_image_run_is_a_clear_error(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples[:1])
    ids = batch["input_ids"].clone()
    run = (ids[0] == backbone.image_token_id).nonzero().flatten()
    ids[0, run[10]] = backbone.processor.tokenizer.convert_tokens_to_ids("red")
    with pytest.raises(TokensieveError, match="contiguous"):
        backbone.layout(ids, batch["attention_mask"])
