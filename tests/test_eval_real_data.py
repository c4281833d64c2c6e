"""`tokensieve eval` on real VQA files (LLaVA layout, Hugging Face datasets on disk) and its bad input."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from tokensieve.backbones import LlavaBackbone
from tokensieve.cli import main
from tokensieve.data.synthetic_eval import heldout_samples
from tokensieve.evaluate.report import load_report
from tokensieve.evaluate.scoring import score

N = 12


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def scenes():
    """The first ``N`` held-out samples at the shipped testbed's size (80px images, 8px patches)."""
    return heldout_samples(N)


@pytest.fixture
def llava_files(tmp_path, scenes):
    """The scenes as a real set in LLaVA's evaluation layout: ``(questions, images, answers)``."""
    images = tmp_path / "images"
    images.mkdir()
    for s in scenes:
        Image.fromarray(s.image).save(images / f"scene{s.index}.png")  # lossless: the same pixels
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": f"q{s.index}", "image": f"scene{s.index}.png", "text": s.question, "category": s.family}
        for s in scenes])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": f"q{s.index}", "answer": s.answer}
                                                       for s in scenes])
    return questions, images, answers


def _eval(capsys, *args) -> list[dict]:
    assert main(["eval", "--timing-samples", "0", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_llava_files_score_as_the_synthetic_samples_they_hold(llava_files, capsys):
    questions, images, answers = llava_files
    synthetic = _eval(capsys, "--method", "random,fastv", "--budget", "0.22", "--samples", str(N))
    files = _eval(capsys, "--method", "random,fastv", "--budget", "0.22", "--questions", str(questions),
                  "--images", str(images), "--answers", str(answers), "--max-new-tokens", "1")
    assert [(r["method"], r["accuracy"], r["per_family"]) for r in files] == [
        (r["method"], r["accuracy"], r["per_family"]) for r in synthetic]
    assert synthetic[0]["accuracy"] > 0.6  # the shipped testbed answers; the comparison is not vacuous


def test_a_hf_dataset_generates_answers_and_the_log_recomputes_the_summary(tmp_path, scenes, capsys):
    rows = {"picture": [s.image for s in scenes], "query": [s.question for s in scenes],
            "votes": [[s.answer] * 10 for s in scenes], "kind": [s.family for s in scenes]}
    features = datasets.Features({"picture": datasets.Image(), "query": datasets.Value("string"),
                                  "votes": datasets.Sequence(datasets.Value("string")),
                                  "kind": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "set"))
    (tmp_path / "spec.yaml").write_text("image: picture\nquestion: query\nanswers: votes\nfamily: kind\n")
    args = ["--method", "random", "--budget", "0.33", "--dataset", str(tmp_path / "set"), "--spec",
            str(tmp_path / "spec.yaml"), "--samples", "8", "--batch-size", "3", "--kept-examples", "0"]
    logs = {}
    for length in ("16", "1"):  # 16 generates (the real-data default); 1 takes the first token's argmax
        out = tmp_path / f"report{length}"
        rows = _eval(capsys, *args, "--out", str(out), *(["--max-new-tokens", "1"] if length == "1" else []))
        assert load_report(out)["meta"]["max_new_tokens"] == int(length) and load_report(out)["meta"]["items"] == 8
        logs[length] = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()[1:]]
        assert len(logs[length]) == 2 * 8
        for row in rows:
            run = "none" if row["method"] == "none" else f"{row['method']}@{row['site']}:{row['budget']}"
            mine = [r for r in logs[length] if r["run"] == run]
            assert all(r["score"] == score(r["prediction"], r["answers"]) for r in mine)  # 10 votes: soft score
            assert row["accuracy"] == round(sum(r["score"] for r in mine) / len(mine), 4)
    assert rows[0]["accuracy"] > 0.6  # the shipped testbed answers in its first token
    # It never learned to stop, so generation runs on; its first word is the one-token answer (the cache is right).
    assert [r["prediction"].split()[0] for r in logs["16"]] == [r["prediction"] for r in logs["1"]]
    assert all(len(r["prediction"].split()) > 1 for r in logs["16"])


def test_kept_token_pictures_are_written_and_embedded(llava_files, tmp_path, capsys):
    questions, images, answers = llava_files
    out = tmp_path / "report"
    _eval(capsys, "--method", "random,fastv", "--budget", "0.22", "--questions", str(questions), "--images",
          str(images), "--answers", str(answers), "--samples", "4", "--kept-examples", "2", "--out", str(out))
    markdown = (out / "report.md").read_text()
    for row in load_report(out)["rows"][1:]:
        kept = row["kept_tokens"]
        assert kept["ids"] == row["examples"]["ids"] == ["q0", "q1"]
        (stage, per_item), = kept["stages"].items()
        assert all(len(k) == row["visual_tokens_kept"] and k == sorted(set(k)) for k in per_item)
    for qid in ("q0", "q1"):  # one gallery per item: every method side by side, with its answer
        picture = out / "kept_tokens" / f"item_{qid}.png"
        assert picture.stat().st_size > 5000 and f"](kept_tokens/{picture.name})" in markdown


def _fails(capsys, *args) -> str:
    assert main(["eval", "--method", "random", "--budget", "0.5", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_real_file_bad_input_names_the_file_and_line(llava_files, tmp_path, capsys):
    questions, images, answers = llava_files
    files = ["--questions", str(questions), "--images", str(images), "--answers", str(answers)]
    (images / "scene3.png").rename(images / "moved.png")
    assert f"{questions} line 4: image scene3.png not found in {images}" in _fails(capsys, *files)
    (images / "moved.png").rename(images / "scene3.png")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"question_id": "q0", "image": "scene0.png"}])
    assert f"{broken} line 1: missing field 'text'" in _fails(
        capsys, "--questions", str(broken), "--images", str(images), "--answers", str(answers))
    short = write_jsonl(tmp_path / "short.jsonl", [{"question_id": "q0", "answer": "red"}])
    assert f"{short} has no answer for 11 (q1, q2, q3, q4, q5, ...) question ids" in _fails(
        capsys, "--questions", str(questions), "--images", str(images), "--answers", str(short))
    assert "needs --questions FILE, --images FOLDER and --answers FILE" in _fails(capsys, "--questions", str(questions))
    assert "--dataset needs --spec" in _fails(capsys, "--dataset", str(tmp_path))
    assert "--oracle needs the synthetic set" in _fails(capsys, *files, "--oracle")


def test_an_unreadable_image_mid_run_loses_nothing_already_scored(llava_files, tmp_path, capsys):
    questions, images, answers = llava_files
    args = ["eval", "--method", "random", "--budget", "0.5", "--questions", str(questions), "--images", str(images),
            "--answers", str(answers), "--batch-size", "4", "--max-new-tokens", "1", "--timing-samples", "0",
            "--kept-examples", "0", "--json", "--out", str(tmp_path / "out")]
    good = (images / "scene9.png").read_bytes()
    (images / "scene9.png").write_bytes(b"not a png")  # found at load time, unreadable when its batch comes
    assert main(args) == 2
    assert f"{questions} line 10: cannot read image {images / 'scene9.png'}" in capsys.readouterr().err
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 1 + 8  # two batches kept
    (images / "scene9.png").write_bytes(good)
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 1 + 2 * N
    assert rows == _eval(capsys, *args[1:-3])


def test_origin_mode_measures_the_unpruned_model_alone(capsys):
    rows = _eval(capsys, "--mode", "origin", "--samples", "6")
    assert [r["method"] for r in rows] == ["none"] and rows[0]["visual_tokens_mean_llm"] == 100
    assert "--mode origin measures the unpruned model alone" in _fails(capsys, "--mode", "origin")


def test_rows_count_visual_tokens_per_stage_and_on_average(capsys):
    two_sites = _eval(capsys, "--method", "fastv", "--budget", "0.5", "--site", "llm.2", "--samples", "4")
    row = two_sites[1]
    assert row["visual_tokens_per_stage"] == {"fastv@llm.2:0.5": 50}
    layers = len(LlavaBackbone.from_pretrained().llm_layers)
    assert row["visual_tokens_mean_llm"] == (2 * 100 + (layers - 2) * 50) / layers  # cut before layer 2


def _scored_ids(folder) -> list[str]:
    return [json.loads(line)["id"] for line in (folder / "samples.jsonl").read_text().splitlines()[1:]]


def test_skip_scores_the_items_after_it_in_either_kind_of_set(llava_files, tmp_path, capsys):
    rows = _eval(capsys, "--mode", "origin", "--samples", "3", "--skip", "4", "--out", str(tmp_path / "synthetic"))
    assert _scored_ids(tmp_path / "synthetic") == ["4", "5", "6"]
    assert "from item 4" in load_report(tmp_path / "synthetic")["meta"]["data"]
    questions, images, answers = llava_files
    files = ("--questions", str(questions), "--images", str(images), "--answers", str(answers), "--max-new-tokens", "1")
    assert _eval(capsys, "--mode", "origin", *files, "--samples", "3", "--skip", "4",
                 "--out", str(tmp_path / "files"))[0]["accuracy"] == rows[0]["accuracy"]
    assert _scored_ids(tmp_path / "files") == ["q4", "q5", "q6"]
    _eval(capsys, "--mode", "origin", *files, "--skip", str(N - 2), "--out", str(tmp_path / "tail"))
    assert _scored_ids(tmp_path / "tail") == [f"q{N - 2}", f"q{N - 1}"]  # no --samples: the rest
    assert f"--skip {N} leaves none of the {N} items" in _fails(capsys, *files, "--skip", str(N))
