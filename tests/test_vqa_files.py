"""Loading real VQA sets: LLaVA evaluation JSONL files and Hugging Face datasets on disk."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from tokensieve.data.vqa_files import load_hf_dataset, load_llava_eval, load_spec
from tokensieve.errors import TokensieveError

# Three solid-colour images of different sizes, so a mix-up shows in shape or pixel value.
PIXELS = [np.full((4 + i, 6, 3), 40 * (i + 1), np.uint8) for i in range(3)]
TEN = ["2"] * 4 + ["two"] * 3 + ["3"] * 3


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def llava(tmp_path):
    """``(questions, image folder, answers)`` paths: ids 10, 11, 12, one answers format each."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, pixels in enumerate(PIXELS):
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 10, "image": "img0.png", "text": "What colour?", "category": "colour"},
        {"question_id": 11, "image": "img1.png", "text": "How many?", "category": "count"},
        {"question_id": 12, "image": "img2.png", "text": "Is it grey?"},
    ])
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 10, "answer": "grey"},
        {"question_id": 11, "answers": [{"answer": a, "answer_id": k} for k, a in enumerate(TEN)]},
        {"question_id": 12, "answers": ["yes", "yes"]},
    ])
    return questions, folder, answers


def test_llava_eval_loads_questions_answers_families_and_images(llava):
    items = load_llava_eval(*llava)
    assert [i.question_id for i in items] == ["10", "11", "12"]
    assert [i.question for i in items] == ["What colour?", "How many?", "Is it grey?"]
    assert [i.answers for i in items] == [["grey"], TEN, ["yes", "yes"]]
    assert [i.family for i in items] == ["colour", "count", "all"]
    for item, pixels in zip(items, PIXELS):
        assert item.image.dtype == np.uint8
        np.testing.assert_array_equal(item.image, pixels)


def test_llava_eval_without_answers_and_images_read_lazily(llava):
    questions, folder, _ = llava
    items = load_llava_eval(questions, folder, None)
    assert all(i.answers == [] for i in items)
    (folder / "img0.png").unlink()  # after loading: only reading the image notices
    with pytest.raises(TokensieveError, match="img0.png"):
        items[0].image


def test_missing_image_names_file_and_line(llava):
    questions, folder, answers = llava
    (folder / "img1.png").unlink()
    with pytest.raises(TokensieveError, match=r"line 2: image img1\.png not found"):
        load_llava_eval(questions, folder, answers)


def test_question_line_missing_a_field(llava, tmp_path):
    _, folder, _ = llava
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "img0.png", "text": "?"},
                                                  {"question_id": 2, "image": "img1.png"}])
    with pytest.raises(TokensieveError, match="line 2: missing field 'text'"):
        load_llava_eval(questions, folder, None)


def test_malformed_json_names_the_line(llava):
    questions, folder, answers = llava
    answers.write_text(answers.read_text() + '{"question_id": 13, "answer": \n')
    with pytest.raises(TokensieveError, match="answers.jsonl line 4: not valid JSON"):
        load_llava_eval(questions, folder, answers)


def test_answers_missing_for_questions_names_ids_and_count(llava, tmp_path):
    questions, folder, _ = llava
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 11, "answer": "2"}])
    with pytest.raises(TokensieveError, match=r"no answer for 2 \(10, 12\) question ids"):
        load_llava_eval(questions, folder, answers)


def test_answers_for_unknown_questions_name_ids_and_count(llava):
    questions, folder, answers = llava
    write_jsonl(answers, [{"question_id": q, "answer": "x"} for q in range(10, 20)])
    with pytest.raises(TokensieveError, match=r"answers 7 \(13, 14, 15, 16, 17, \.\.\.\) question ids that are not"):
        load_llava_eval(questions, folder, answers)


def test_answer_line_without_an_answer(llava):
    questions, folder, answers = llava
    write_jsonl(answers, [{"question_id": 10}])
    with pytest.raises(TokensieveError, match="line 1: missing field 'answer' or 'answers'"):
        load_llava_eval(questions, folder, answers)


def test_repeated_question_ids(llava, tmp_path):
    _, folder, _ = llava
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "img0.png", "text": "?"}] * 2)
    with pytest.raises(TokensieveError, match=r"repeats 1 \(1\) question ids"):
        load_llava_eval(questions, folder, None)


# --- Hugging Face datasets ---------------------------------------------------------------

SPEC = {"image": "img", "question": "q", "answers": "ans_dicts", "question_id": "qid", "family": "kind"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The same three rows saved with ``save_to_disk``, as one parquet file and as a parquet
    folder; the answers come in every supported shape, one column each."""
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({
        "img": datasets.Image(), "q": datasets.Value("string"), "qid": datasets.Value("int64"),
        "kind": datasets.Value("string"), "ans_str": datasets.Value("string"),
        "ans_list": datasets.List(datasets.Value("string")),
        "ans_dicts": datasets.List({"answer": datasets.Value("string")}),
        # A Sequence of dicts comes back as a dict of lists.
        "ans_seq": datasets.Sequence({"answer": datasets.Value("string"), "answer_id": datasets.Value("int32")}),
    })
    ds = datasets.Dataset.from_dict({
        "img": [Image.fromarray(p) for p in PIXELS], "q": ["q0", "q1", "q2"], "qid": [7, 8, 9],
        "kind": ["colour", "count", "colour"], "ans_str": ["a", "b", "c"],
        "ans_list": [["a"], TEN, ["c", "d"]],
        "ans_dicts": [[{"answer": "a"}], [{"answer": t} for t in TEN], [{"answer": "c"}, {"answer": "d"}]],
        "ans_seq": [{"answer": ["a"], "answer_id": [0]}, {"answer": TEN, "answer_id": list(range(10))},
                    {"answer": ["c", "d"], "answer_id": [0, 1]}],
    }, features=features)
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([2, 1])}).save_to_disk(str(root / "splits"))
    ds.to_parquet(str(root / "one.parquet"))
    (root / "folder").mkdir()
    ds.to_parquet(str(root / "folder" / "validation-00000-of-00001.parquet"))
    return root


@pytest.fixture(autouse=True)
def _dataset_cache(tmp_path, monkeypatch):
    """Parquet loading writes an Arrow cache; keep it out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.mark.parametrize("source", ["saved", "one.parquet", "folder"])
def test_hf_dataset_loads_from_disk_and_parquet(hf, source):
    items = load_hf_dataset(hf / source, SPEC)
    assert [i.question_id for i in items] == ["7", "8", "9"]
    assert [i.question for i in items] == ["q0", "q1", "q2"]
    assert [i.answers for i in items] == [["a"], TEN, ["c", "d"]]
    assert [i.family for i in items] == ["colour", "count", "colour"]
    for item, pixels in zip(items, PIXELS):
        assert item.image.dtype == np.uint8
        np.testing.assert_array_equal(item.image, pixels)


@pytest.mark.parametrize(("column", "first"), [("ans_str", ["a"]), ("ans_list", ["a"]),
                                              ("ans_dicts", ["a"]), ("ans_seq", ["a"])])
def test_hf_answers_in_every_shape(hf, column, first):
    items = load_hf_dataset(hf / "saved", {**SPEC, "answers": column})
    assert items[0].answers == first
    assert items[1].answers == (["b"] if column == "ans_str" else TEN)


def test_hf_defaults_without_id_and_family_columns(hf):
    items = load_hf_dataset(hf / "saved", {"image": "img", "question": "q", "answers": "ans_str"})
    assert [(i.question_id, i.family) for i in items] == [("0", "all"), ("1", "all"), ("2", "all")]


def test_hf_split_selection(hf):
    assert [i.question_id for i in load_hf_dataset(hf / "splits", {**SPEC, "split": "validation"})] == ["9", "8"]
    with pytest.raises(TokensieveError, match="holds splits train, validation; name one"):
        load_hf_dataset(hf / "splits", SPEC)
    with pytest.raises(TokensieveError, match="split 'test' not in .*its splits: train, validation"):
        load_hf_dataset(hf / "splits", {**SPEC, "split": "test"})
    with pytest.raises(TokensieveError, match="single dataset without splits"):
        load_hf_dataset(hf / "saved", {**SPEC, "split": "train"})


def test_hf_unknown_spec_key_lists_the_known_ones(hf):
    with pytest.raises(TokensieveError, match="unknown key.*'label'.*known: image, question, answers, question_id"):
        load_hf_dataset(hf / "saved", {**SPEC, "label": "q"})


def test_hf_missing_spec_key(hf):
    with pytest.raises(TokensieveError, match="missing key.*answers"):
        load_hf_dataset(hf / "saved", {"image": "img", "question": "q"})


def test_hf_unknown_column_lists_the_columns(hf):
    with pytest.raises(TokensieveError, match="'question' not in .*its columns: img, q, qid, kind"):
        load_hf_dataset(hf / "saved", {**SPEC, "question": "question"})


def test_hf_image_column_must_hold_images(hf):
    with pytest.raises(TokensieveError, match="column 'q' .* not an Image feature"):
        load_hf_dataset(hf / "saved", {**SPEC, "image": "q"})


def test_hf_path_that_is_no_dataset(tmp_path):
    with pytest.raises(TokensieveError, match="neither a dataset saved with save_to_disk nor a parquet"):
        load_hf_dataset(tmp_path, SPEC)


def test_load_spec_reads_and_checks_yaml(hf, tmp_path):
    good = tmp_path / "spec.yaml"
    good.write_text("image: img\nquestion: q\nanswers: ans_list\nfamily: kind\n")
    assert load_spec(good) == {"image": "img", "question": "q", "answers": "ans_list", "family": "kind"}
    assert [i.answers for i in load_hf_dataset(hf / "saved", load_spec(good))][1] == TEN
    bad = tmp_path / "bad.yaml"
    for text, problem in [("image: img\nquestion: q\nanswers: a\ncolour: c\n", "unknown key"),
                          ("image: [img\n", "not valid YAML"),
                          ("- image\n", "must be a mapping")]:
        bad.write_text(text)
        with pytest.raises(TokensieveError, match=problem):
            load_spec(bad)
