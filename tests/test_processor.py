"""The offline tokenizer and LlavaProcessor survive save_pretrained / from_pretrained."""

from __future__ import annotations

import torch
from transformers import AutoProcessor

from tokensieve.backbones.llava_prompt import encode, prompt
from tokensieve.data.synthetic import make_sample
from tokensieve.testbed.processor import build_processor


def test_prompt_is_llava_chat_format():
    assert prompt("What color is the circle?") == "USER: <image>\nWhat color is the circle? ASSISTANT:"


def test_no_unknown_tokens_and_image_expands_to_every_patch():
    processor = build_processor()
    s = make_sample(0, 0)
    batch = encode(processor, [s])
    ids = batch["input_ids"][0].tolist()
    tok = processor.tokenizer
    assert tok.unk_token_id not in ids
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 100
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["ASSISTANT", ":"]
    assert batch["pixel_values"].shape == (1, 3, 80, 80)


def test_save_and_reload_gives_identical_inputs(tmp_path):
    processor = build_processor()
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path, backend="pil")  # as LlavaBackbone.from_pretrained loads it
    samples = [make_sample(0, i) for i in range(4)]
    a, b = encode(processor, samples), encode(reloaded, samples)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
