"""`bench speed` runs CDPruner with all its work: each prompt's question decoded to text and read by a
random CLIP text tower of the shape's size (the CLIP-L/14 text tower on the 7B shapes).

No timing is asserted: what is checked is that the question reaches the CLIP tokeniser whole, one CLIP
token per prompt token, and that every bench shape gives CDPruner a row."""

from __future__ import annotations

import pytest
import torch
from test_eval_and_bench import MICRO
from test_next_bench import TINY as NEXT
from test_qwen_bench import TINY as QWEN

from tokensieve.evaluate.bench_question import ClipTextSize, bench_clip_encoder, question_processor
from tokensieve.evaluate.next_bench import NextBenchShape
from tokensieve.evaluate.qwen_bench import QwenBenchShape
from tokensieve.evaluate.speed import BenchShape, speed_benchmark
from tokensieve.methods.cdpruner import ClipTextEncoder


def test_each_prompt_token_is_one_word_and_one_clip_token():
    text = question_processor(100).tokenizer.decode(torch.tensor([5, 7, 99]), skip_special_tokens=True)
    assert text == "w5 w7 w99"
    encoder = bench_clip_encoder(ClipTextSize(vocab=60), vision_width=16)
    ids = encoder.tokenizer(text=text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[58, 5, 7, 57, 59]]  # start, two words, one past the vocabulary (unknown), end
    embeds, = encoder.embed_texts([text])
    assert embeds.shape == (1, 192) and encoder.embed_patches(torch.randn(2, 3, 16)).shape == (2, 3, 192)


def test_the_7b_shapes_read_the_question_with_clip_l14s_text_tower():
    clip_l = ClipTextSize(layers=12, hidden=768, heads=12, intermediate=3072, projection=768)
    for big in (BenchShape.llava7b(), NextBenchShape.llava_next_7b(), QwenBenchShape.qwen25_vl_7b()):
        assert big.clip_text == clip_l
    assert (BenchShape.llava7b().projector_input_width, QwenBenchShape.qwen25_vl_7b().projector_input_width) == \
        (1024, 4 * 1280)


@pytest.mark.parametrize(("shape", "kept"), [(MICRO, 8), (NEXT, 40), (QWEN, 4)], ids=["llava", "llava-next", "qwen2.5-vl"])
def test_cdpruner_gets_a_row_and_reads_each_prompts_question(shape, kept, monkeypatch):
    texts = []
    embed = ClipTextEncoder.embed_texts
    monkeypatch.setattr(ClipTextEncoder, "embed_texts", lambda self, t: texts.extend(t) or embed(self, t))
    row, = speed_benchmark(shape, ("cdpruner",), (0.5,), repeats=1, progress=False, new_tokens=2, batch=2)
    assert (row["method"], row["site"], row["visual_tokens_kept"]) == ("cdpruner", "llm.0", kept)
    assert 0 < row["scoring_overhead"] < 1 and row["native_bound_ms"] > 0
    ids = shape.inputs(2)["input_ids"]
    assert len(texts) >= 2  # each row's question, once per pass that reads it
    for text, prompt in zip(texts[:2], ids):
        after_image = prompt[int((prompt == shape.vocab - 1).nonzero().max()) + 1:].tolist()  # the image token
        assert [int(word[1:]) for word in text.split()] == after_image and len(after_image) >= 4
