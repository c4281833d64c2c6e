"""LLaVA-Instruct training data: loading, rendering, the labelled collate, the synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokensieve.backbones.llava_prompt import prompt
from tokensieve.data.instruct import (
    IGNORE_INDEX, InstructExample, collate, load_instruct, render_conversation, synthetic_examples,
)
from tokensieve.data.synthetic import make_sample
from tokensieve.errors import TokensieveError
from tokensieve.testbed.processor import build_processor

# Every word below is in the testbed vocabulary, so no token decodes to <unk>.
MULTI = {"id": "conv-1", "image": "img0.png", "conversations": [
    {"from": "human", "value": "What color is the circle?\n<image>"},  # marker after the text
    {"from": "gpt", "value": "the circle is red"},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "there are 3 objects"},
    {"from": "human", "value": "Is there a blue square?"},
    {"from": "gpt", "value": "no"},
]}
SINGLE = {"id": 7, "image": "sub/img1.png", "conversations": [
    {"from": "human", "value": "<image>\nIs there a red circle?"},
    {"from": "gpt", "value": "yes"},
]}
MULTI_TURNS = [("What color is the circle?", "the circle is red"),
               ("How many objects are there?", "there are 3 objects"), ("Is there a blue square?", "no")]
# Solid colours, so a mix-up of images shows in the pixels.
PIXELS = [np.full((80, 80, 3), 50 * (i + 1), np.uint8) for i in range(2)]


def write_records(path, records, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records, indent=1))
    return path


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(PIXELS[0]).save(images / "img0.png")
    Image.fromarray(PIXELS[1]).save(images / "sub" / "img1.png")
    return images


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def runs(positions):
    """Split sorted positions into runs of consecutive ones."""
    groups = []
    for p in positions:
        if groups and p == groups[-1][-1] + 1:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


@pytest.mark.parametrize("jsonl", [False, True])
def test_records_load_from_json_and_jsonl(tmp_path, folder, jsonl):
    examples = load_instruct(write_records(tmp_path / "data.json", [MULTI, SINGLE], jsonl), folder)
    assert [e.id for e in examples] == ["conv-1", "7"]
    assert examples[0].turns == MULTI_TURNS  # the marker taken out wherever it stood
    assert examples[1].turns == [("Is there a red circle?", "yes")]
    assert [e.image_path for e in examples] == [folder / "img0.png", folder / "sub" / "img1.png"]
    for example, pixels in zip(examples, PIXELS):
        assert example.image.dtype == np.uint8
        np.testing.assert_array_equal(example.image, pixels)


def test_render_follows_llava_15_and_starts_with_the_testbed_prompt():
    text, spans = render_conversation(MULTI_TURNS)
    assert text == ("USER: <image>\nWhat color is the circle? ASSISTANT: the circle is red</s>"
                    "USER: How many objects are there? ASSISTANT: there are 3 objects</s>"
                    "USER: Is there a blue square? ASSISTANT: no</s>")
    assert [text[a:b] for a, b in spans] == [answer + "</s>" for _, answer in MULTI_TURNS]
    single, _ = render_conversation([("Is there a red circle?", "yes")])
    assert single == prompt("Is there a red circle?") + " yes</s>"


def test_eos_glued_to_a_word_is_the_eos_token(processor):
    tok = processor.tokenizer
    ids = tok("yes</s>USER", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids("yes"), tok.eos_token_id, tok.convert_tokens_to_ids("USER")]


def test_multi_turn_labels_cover_exactly_the_answers_and_eos(tmp_path, folder, processor):
    example = load_instruct(write_records(tmp_path / "d.json", [MULTI]), folder)[0]
    batch = collate(processor, [example])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert torch.equal(labels[labelled], ids[labelled])
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    answer_runs = runs(labelled)
    assert [[tokens[p] for p in run] for run in answer_runs] == [a.split() + ["</s>"] for _, a in MULTI_TURNS]
    assert all(ids[run[-1]] == processor.tokenizer.eos_token_id for run in answer_runs)
    assert all(tokens[run[0] - 2 : run[0]] == ["ASSISTANT", ":"] for run in answer_runs)
    assert (ids == processor.image_token_id).sum() == 100  # <image> expanded, one token a patch


def test_synthetic_examples_match_the_synthetic_set():
    examples = synthetic_examples(3, 10, 2, family_weights={"count": 1.0})
    for example, index in zip(examples, (10, 11)):
        sample = make_sample(3, index, family_weights={"count": 1.0})
        assert example.id == f"synthetic-3-{index}"
        assert example.turns == [(sample.question, sample.answer)]
        assert example.image_path is None
        np.testing.assert_array_equal(example.image, sample.image)
    assert examples[0].turns != examples[1].turns or not np.array_equal(examples[0].image, examples[1].image)


def test_single_turn_label_starts_at_the_answer_after_the_testbed_prompt(processor):
    example = synthetic_examples(0, 5, 1)[0]
    (question, answer), = example.turns
    batch = collate(processor, [example])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt_ids = processor(images=[example.image], text=[prompt(question)])["input_ids"][0]
    assert ids[:first] == prompt_ids
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(ids[first - 2 : first]) == ["ASSISTANT", ":"]
    assert labels[first:] == [tok.convert_tokens_to_ids(answer), tok.eos_token_id]
    assert ids[first:] == labels[first:]


def test_left_padding_keeps_labels_aligned(tmp_path, folder, processor):
    examples = load_instruct(write_records(tmp_path / "d.json", [MULTI, SINGLE]), folder)
    examples += synthetic_examples(0, 0, 1, family_weights={"shape_of_color": 1.0})  # a third length
    batch = collate(processor, examples)
    width = batch["input_ids"].shape[1]
    assert batch["pixel_values"].shape == (3, 3, 80, 80)
    lengths = []
    for k, example in enumerate(examples):
        alone = collate(processor, [example])
        n = alone["input_ids"].shape[1]
        lengths.append(n)
        assert torch.equal(batch["input_ids"][k, width - n :], alone["input_ids"][0])
        assert torch.equal(batch["labels"][k, width - n :], alone["labels"][0])
        assert torch.equal(batch["pixel_values"][k], alone["pixel_values"][0])
        assert (batch["input_ids"][k, : width - n] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][k, : width - n] == IGNORE_INDEX).all()
        assert batch["attention_mask"][k].tolist() == [0] * (width - n) + [1] * n
    assert len(set(lengths)) == 3 and max(lengths) == width


def test_padding_side_follows_the_tokenizer(tmp_path, folder):
    processor = build_processor()
    processor.tokenizer.padding_side = "right"
    examples = load_instruct(write_records(tmp_path / "d.json", [MULTI, SINGLE]), folder)
    batch = collate(processor, examples)
    n = collate(processor, examples[1:])["input_ids"].shape[1]
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert batch["labels"][1, n - 1] == processor.tokenizer.eos_token_id


def test_truncation_keeps_labels_and_refuses_to_cut_image_tokens(tmp_path, folder):
    processor = build_processor()
    example = load_instruct(write_records(tmp_path / "d.json", [MULTI]), folder)[0]
    full = collate(processor, [example])
    n = full["input_ids"].shape[1]
    cut = collate(processor, [example], max_length=n - 5)
    assert torch.equal(cut["input_ids"], full["input_ids"][:, : n - 5])
    assert torch.equal(cut["labels"], full["labels"][:, : n - 5])
    assert torch.equal(collate(processor, [example], max_length=n)["labels"], full["labels"])
    with pytest.raises(TokensieveError,
                       match=r"example conv-1: max_length 50 would cut its image tokens \(47 of 100 kept, 143 tokens"):
        collate(processor, [example], max_length=50)
    processor.tokenizer.truncation_side = "left"  # the same cut now falls on <s> USER : and 2 image tokens
    with pytest.raises(TokensieveError, match=r"example conv-1: max_length 138 .* \(98 of 100"):
        collate(processor, [example], max_length=n - 5)


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


def _with_messages(*messages):
    return {**MULTI, "conversations": [{"from": who, "value": value} for who, value in messages]}


@pytest.mark.parametrize(("record", "message"), [
    (_without(MULTI, "conversations"), r" \(id conv-1\): missing field 'conversations'"),
    (_without(MULTI, "id"), r": missing field 'id'"),
    ({**MULTI, "conversations": "hello"}, r" \(id conv-1\): field 'conversations' must be a non-empty list"),
    ({**MULTI, "conversations": [{"from": "human"}]}, r" \(id conv-1\): conversations\[0\] must be an object"),
    (_with_messages(("human", "<image>\nIs there a red circle?"), ("human", "yes")),
     r" \(id conv-1\): conversations\[1\] is from 'human', expected 'gpt'"),
    (_with_messages(("gpt", "<image>\nyes"), ("human", "Is there a red circle?")),
     r" \(id conv-1\): conversations\[0\] is from 'gpt', expected 'human'"),
    (_with_messages(("human", "<image>\nIs there a red circle?"), ("gpt", "yes"), ("human", "How many?")),
     r" \(id conv-1\): the conversation ends on a human message"),
    (_with_messages(("human", "Is there a red circle?"), ("gpt", "yes")),
     r" \(id conv-1\): the <image> marker must appear exactly once.*found 0$"),
    (_with_messages(("human", "<image>\nIs there a red circle?<image>"), ("gpt", "yes")),
     r" \(id conv-1\): the <image> marker .* found 2 \(in conversations\[0\], conversations\[0\]\)"),
    (_with_messages(("human", "<image>\nIs there a red circle?"), ("gpt", "yes"), ("human", "<image>\nAnd?"),
                    ("gpt", "no")),
     r" \(id conv-1\): the <image> marker .* found 2 \(in conversations\[0\], conversations\[2\]\)"),
    (_with_messages(("human", "Is there a red circle?"), ("gpt", "<image> yes")),
     r" \(id conv-1\): the <image> marker .* found 1 \(in conversations\[1\]\)"),
    ({**MULTI, "image": "nothere.png"}, r" \(id conv-1\): image nothere\.png not found in .*images"),
    ({**MULTI, "image": ["img0.png"]}, r" \(id conv-1\): field 'image' must be a file name"),
])
def test_bad_records_name_the_file_record_and_field(tmp_path, folder, record, message):
    path = write_records(tmp_path / "bad.json", [record])
    with pytest.raises(TokensieveError, match=r"bad\.json entry 0" + message):
        load_instruct(path, folder)


def test_bad_jsonl_record_names_its_line_and_id(tmp_path, folder):
    path = write_records(tmp_path / "bad.jsonl", [MULTI, {**SINGLE, "image": "gone.png"}], jsonl=True)
    with pytest.raises(TokensieveError, match=r"bad\.jsonl line 2 \(id 7\): image gone\.png not found"):
        load_instruct(path, folder)


def test_invalid_json_names_the_line(tmp_path, folder):
    listed = tmp_path / "list.json"
    listed.write_text('[\n {"id": 1,\n  "image": }\n]')
    with pytest.raises(TokensieveError, match=r"list\.json line 3: not valid JSON"):
        load_instruct(listed, folder)
    lines = write_records(tmp_path / "lines.jsonl", [MULTI, SINGLE], jsonl=True)
    lines.write_text(lines.read_text() + '{"id": 9, "image": \n')
    with pytest.raises(TokensieveError, match=r"lines\.jsonl line 3: not valid JSON"):
        load_instruct(lines, folder)
    with pytest.raises(TokensieveError, match=r"lines\.jsonl line 2: expected a JSON object, got list"):
        load_instruct(write_records(tmp_path / "lines.jsonl", [MULTI, [SINGLE]], jsonl=True), folder)


def test_missing_file_folder_or_records(tmp_path, folder):
    with pytest.raises(TokensieveError, match=r"nothere\.json does not exist"):
        load_instruct(tmp_path / "nothere.json", folder)
    path = write_records(tmp_path / "d.json", [MULTI])
    with pytest.raises(TokensieveError, match=r"image folder .*noimages does not exist"):
        load_instruct(path, tmp_path / "noimages")
    with pytest.raises(TokensieveError, match=r"empty\.json holds no records"):
        load_instruct(write_records(tmp_path / "empty.json", []), folder)


def test_unreadable_image_fails_when_read_naming_the_file(tmp_path, folder, processor):
    (folder / "broken.png").write_bytes(b"not a png")
    example, = load_instruct(write_records(tmp_path / "d.json", [{**MULTI, "image": "broken.png"}]), folder)
    with pytest.raises(TokensieveError, match=r"cannot read image .*broken\.png"):
        example.image
    with pytest.raises(TokensieveError, match=r"broken\.png"):
        collate(processor, [example])


def test_file_images_are_read_lazily(tmp_path, folder):
    example, = load_instruct(write_records(tmp_path / "d.json", [MULTI]), folder)
    np.testing.assert_array_equal(example.image, PIXELS[0])
    Image.fromarray(PIXELS[1]).save(folder / "img0.png")  # replaced after loading: the new pixels show
    np.testing.assert_array_equal(example.image, PIXELS[1])


def test_in_memory_example_is_built_from_an_array():
    pixels = PIXELS[1]
    example = InstructExample.from_array("a", [("Is there a red circle?", "yes")], pixels)
    assert example.image_path is None and example.image is pixels


def test_text_only_records_are_skipped(tmp_path, folder):
    text_only = _without(MULTI, "image")
    examples = load_instruct(write_records(tmp_path / "mix.json", [text_only, MULTI]), folder)
    assert [e.id for e in examples] == ["conv-1"]
    with pytest.raises(TokensieveError, match=r"no record with an image"):
        load_instruct(write_records(tmp_path / "text.json", [text_only]), folder)
