"""The Qwen-VL adapter on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models saved locally:
loading, layout of several images per row, and the kept= path (M-RoPE ids kept, DeepStack cut)."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen import ROWS, image, row_alone, until_eos

from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.backbones.qwen_layout import question_columns
from tokensieve.backbones.qwen_prompt import encode
from tokensieve.errors import TokensieveError

# Per image of the batch below (16, 6 and 16 visual tokens): the tokens that stay.
KEPT = [torch.tensor([0, 3, 5, 9, 10, 15]), torch.tensor([1, 2, 4]), torch.tensor([2, 7, 8, 14])]


def masked_reference(qwen, batch, kept):
    """The model itself with every token present and the dropped visual columns masked out
    (attention mask 0, every position id as in the full prompt)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos, _ = qwen.model.model.get_rope_index(ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=mask)
    positions = torch.cat([(mask.cumsum(-1) - 1).clamp(min=0)[None], pos])
    soft = mask.clone()
    for b, row in enumerate(qwen.layout(ids, mask).runs):
        for run in row:
            dropped = torch.ones(run.count, dtype=torch.bool)
            dropped[kept[run.unit]] = False
            soft[b, run.start + dropped.nonzero().flatten()] = 0
    return dict(batch, attention_mask=soft, position_ids=positions)


def test_loads_family_and_processor(qwen, tiny_qwen_dir):
    assert qwen.family == tiny_qwen_dir.name.rstrip("0123456789")
    assert type(qwen.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_layout_several_images_per_row(qwen, mixed):
    layout = qwen.layout(mixed["input_ids"], mixed["attention_mask"])
    assert [[(r.count, r.unit) for r in row] for row in layout.runs] == [[(16, 0)], [(6, 1), (16, 2)]]
    assert layout.kinds == ["image"] * 3 and layout.units == [[0], [1, 2]]
    ids = mixed["input_ids"]
    for b, row in enumerate(layout.runs):
        for run in row:
            assert (ids[b, run.start: run.start + run.count] == qwen.image_token_id).all()
            assert ids[b, run.start - 1] == qwen.config.vision_start_token_id
    tok = qwen.processor.tokenizer
    question = tok.convert_ids_to_tokens(ids[1][layout.question_mask[1]].tolist())
    assert question[:7] == ["<|vision_end|>", "what", "shape", "is", "left", "and", "right"]


def test_question_columns_of_a_left_padded_batch_are_the_masks(qwen, mixed):
    """Read from the layout on the host, each row's question columns are its question mask's True columns;
    the batch's tail runs from the earliest question start to the end."""
    layout = qwen.layout(mixed["input_ids"], mixed["attention_mask"])
    columns, tail = question_columns(layout)
    assert [c.tolist() for c in columns] == [row.nonzero().flatten().tolist() for row in layout.question_mask]
    assert tail == layout.question_mask.shape[1] - min(int(c[0]) for c in columns)
    answers = torch.zeros_like(layout.question_mask)
    answers[:, -2:] = True  # the read path, with the last two columns left out
    read, read_tail = question_columns(layout, answers)
    assert [r.tolist() for r in read] == [c[:-2].tolist() for c in columns] and read_tail == tail


def test_nothing_kept_out_is_the_plain_model(qwen, mixed):
    assert (mixed["attention_mask"] == 0).any(), "the batch must actually be padded"
    with torch.no_grad():
        assert torch.equal(qwen.forward(**mixed).logits, qwen.model(**mixed).logits)


def test_kept_equals_masked_reference(qwen, mixed):
    with torch.no_grad():
        hard = qwen.forward(**mixed, kept=KEPT).logits[:, -1]
        soft = qwen.model(**masked_reference(qwen, mixed, KEPT)).logits[:, -1]
        full = qwen.model(**mixed).logits[:, -1]
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)
    assert (hard - full).abs().max() > 1e-3, "dropping tokens must change the answer"


def test_kept_shrinks_each_run(qwen, mixed):
    prepared = qwen.prepare(**mixed, kept=KEPT)
    dropped = torch.tensor([16 - 6, (6 - 3) + (16 - 4)])
    assert prepared.attention_mask.sum(1).tolist() == (mixed["attention_mask"].sum(1) - dropped).tolist()
    assert prepared.input_ids.shape[1] == int(prepared.attention_mask.sum(1).max())
    assert [[r.count for r in row] for row in qwen.layout(prepared.input_ids, prepared.attention_mask).runs] == [[6], [3, 4]]
    assert prepared.position_ids.shape == (4, *prepared.input_ids.shape)


@pytest.mark.parametrize("with_kept", [False, True])
def test_padded_batch_equals_each_row_alone(qwen, mixed, with_kept):
    per_row = [KEPT[:1], KEPT[1:]]
    with torch.no_grad():
        together = qwen.forward(**mixed, kept=KEPT if with_kept else None).logits[:, -1]
        for b in range(len(ROWS)):
            alone = row_alone(qwen, mixed, b)
            single = qwen.forward(**alone, kept=per_row[b] if with_kept else None).logits[:, -1]
            torch.testing.assert_close(together[b : b + 1], single, rtol=1e-5, atol=1e-5)


def test_generate_with_kept_equals_masked_reference_and_no_cache(qwen, mixed):
    eos = qwen.config.text_config.eos_token_id
    with torch.no_grad():
        new = qwen.generate(**mixed, kept=KEPT, max_new_tokens=4, do_sample=False)
        reference = qwen.model.generate(**masked_reference(qwen, mixed, KEPT), max_new_tokens=4, do_sample=False)
        assert until_eos(new, eos) == until_eos(reference[:, mixed["input_ids"].shape[1]:], eos)
        ids, mask = mixed["input_ids"], mixed["attention_mask"]
        for _ in range(4):  # no cache: the whole prompt again each step, the new tokens appended as text
            step = dict(mixed, input_ids=ids, attention_mask=mask, mm_token_type_ids=None)
            token = qwen.forward(**step, kept=KEPT, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert until_eos(new, eos) == until_eos(ids[:, mixed["input_ids"].shape[1]:], eos)


def test_nothing_kept_out_generates_as_the_plain_model(qwen, mixed):
    with torch.no_grad():
        plain = qwen.model.generate(**mixed, max_new_tokens=4, do_sample=False)
        assert torch.equal(qwen.generate(**mixed, max_new_tokens=4, do_sample=False),
                           plain[:, mixed["input_ids"].shape[1]:])


def test_encode_asks_each_sample_in_the_chat_format(qwen):
    class Sample:
        image, question = image("small"), "what is the colour ?"

    batch = encode(qwen.processor, [Sample()], qwen.system_prompt)
    text = qwen.processor.tokenizer.decode(batch["input_ids"][0])
    assert text.count("<|image_pad|>") == 6 and text.startswith("<|im_start|>")
    assert ("system" in text) == (qwen.family != "qwen3_vl")


@pytest.mark.parametrize(("kept", "words"), [
    ([torch.tensor([5, 3]), torch.tensor([1]), torch.tensor([2])], "kept image 0: indices must increase"),
    ([torch.tensor([0]), torch.tensor([1, 6]), torch.tensor([2])], "kept image 1: index 6 is outside the 6 visual"),
    ([torch.tensor([0]), torch.tensor([1])], "kept has 2 entries for the 3 images"),
    ([torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])], "kept image 0: expected a 1-D tensor"),
])
def test_bad_kept_is_one_line(qwen, mixed, kept, words):
    with pytest.raises(TokensieveError, match=words) as caught:
        qwen.forward(**mixed, kept=kept)
    assert "\n" not in str(caught.value)


def test_mismatched_runs_are_refused(qwen, mixed):
    ids = mixed["input_ids"].clone()
    ids[0, -3] = qwen.video_token_id  # a video placeholder without a video
    with pytest.raises(TokensieveError, match="the prompts hold 1 videos for 0 videos"):
        qwen.forward(**dict(mixed, input_ids=ids))
    with pytest.raises(TokensieveError, match="3 image placeholder runs for 2 images"):
        qwen.forward(**dict(mixed, image_grid_thw=mixed["image_grid_thw"][:2]))


def test_not_a_qwen_checkpoint(tiny_llava_dir):
    with pytest.raises(TokensieveError, match="is a 'llava' model; the Qwen-VL backbone needs") as caught:
        QwenVLBackbone.from_pretrained(tiny_llava_dir)
    assert "\n" not in str(caught.value)



def test_rope_deltas_continue_from_the_full_prompt(qwen, mixed):
    """After a drop the next token's position (``rope_deltas`` + kept length) is the unpruned one."""
    mask = mixed["attention_mask"]
    _, full = qwen.model.model.get_rope_index(mixed["input_ids"], mixed["mm_token_type_ids"],
                                              image_grid_thw=mixed["image_grid_thw"], attention_mask=mask)
    prepared = qwen.prepare(**mixed, kept=KEPT)
    kept_next = qwen.model.model.rope_deltas + prepared.attention_mask.sum(1, keepdim=True)
    assert torch.equal(kept_next, full + mask.sum(1, keepdim=True))
    assert torch.equal(kept_next[:, 0], prepared.position_ids[1:, :, -1].max(0).values + 1)


def test_corrupt_weights_are_one_line(tmp_path, tiny_qwen_dir):
    import shutil

    broken = shutil.copytree(tiny_qwen_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TokensieveError, match="cannot load the weights") as caught:
        QwenVLBackbone.from_pretrained(broken)
    assert "\n" not in str(caught.value)
