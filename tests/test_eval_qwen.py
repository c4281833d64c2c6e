"""`tokensieve eval` on the tiny random Qwen-VL checkpoints of every family (accuracy is meaningless on
random weights): the pipeline runs end to end on images of different sizes, the token counts and
FLOPs of its rows are those of real forward passes, and what the Qwen backbone refuses is one line."""

from __future__ import annotations

import json

import pytest
import torch
from test_qwen_two_stage import SETTINGS
from tiny_qwen import image, save_tiny_qwen
from tiny_qwen_testbed import save_untrained_qwen_testbed
from tiny_two_stage import tiny_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig

from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.chat_format import encode_samples
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.backbones.load import load_backbone
from tokensieve.cli import main
from tokensieve.data.synthetic_eval import heldout_samples, scene_spec_for
from tokensieve.data.vqa_files import load_llava_eval
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.kept_overlays import example_views
from tokensieve.evaluate.oracle import per_image_oracle
from tokensieve.evaluate.report import load_report
from tokensieve.pruner import TwoStagePruner
from tokensieve.testbed.qwen_model import QWEN_SCENES

SIZES = ["big", "small", "big", "small"]  # 16 and 6 visual tokens: 11 on average
QUESTION = "what is the colour ?"  # one question: every prompt has the median text length


@pytest.fixture
def vqa_files(tmp_path):
    """Four items in LLaVA's evaluation layout, with images of two sizes."""
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate(SIZES):
        image(size, seed=i).save(images / f"{i}.png")
    questions, answers = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"{i}.png", "text": QUESTION}) + "\n"
                                 for i in range(len(SIZES))))
    answers.write_text("".join(json.dumps({"question_id": f"q{i}", "answer": "red"}) + "\n" for i in range(len(SIZES))))
    return ["--questions", str(questions), "--images", str(images), "--answers", str(answers)]


def counted_flops(qwen: QwenVLBackbone, items, keep: int | None = None) -> float:
    """Torch's FLOP count of one prefill of each item (eager attention, logits of the last position
    only, as generate's prefill), keeping the first ``keep`` visual tokens of its image; the mean."""
    for config in (qwen.config, qwen.config.vision_config, qwen.config.text_config):
        config._attn_implementation = "eager"  # torch's counter skips the CPU SDPA kernel
    total = 0
    for item in items:
        batch = encode_samples(qwen, [item])
        kept = None if keep is None else [torch.arange(keep)]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            qwen.forward(**batch, kept=kept, logits_to_keep=1)
        total += counter.get_total_flops()
    return total / len(items)


@pytest.mark.parametrize("site", ["llm.0", "projector"])  # the same tokens on Qwen-VL: the patch merger's output
def test_eval_runs_on_a_qwen_checkpoint_with_images_of_different_sizes(tiny_qwen_dir, vqa_files, tmp_path, capsys,
                                                                       site):
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tiny_qwen_dir), "--method", "random", "--site", site, "--budget", "4",
                 *vqa_files, "--max-new-tokens", "3", "--timing-samples", "1", "--json", "--out", str(out)]) == 0
    baseline, pruned = rows = json.loads(capsys.readouterr().out)
    assert load_report(out)["rows"] == rows and (out / "report.md").stat().st_size > 0
    report = load_report(out)
    text = report["meta"]["text_tokens_for_flops"]
    assert "means over the items" in report["meta"]["visual_tokens"]
    assert (baseline["visual_tokens_kept"], pruned["visual_tokens_kept"]) == (11, 4)  # (16 + 6) / 2; 4 per image
    assert baseline["tokens_per_llm_layer"] == [text + 11] * 3 and pruned["tokens_per_llm_layer"] == [text + 4] * 3
    assert pruned["visual_tokens_mean_llm"] == 4
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()[1:]]
    assert [r["kept"] for r in records if r["run"] == f"random@{site}:4"] == [{f"random@{site}:4": 4}] * 4
    assert all(row["ttft_ms"] > 0 and 0 <= row["accuracy"] <= 1 for row in rows)

    qwen = QwenVLBackbone.from_pretrained(tiny_qwen_dir)
    items = load_llava_eval(*(vqa_files[i] for i in (1, 3, 5)))
    text_tokens = len(encode_samples(qwen, items[1:2])["input_ids"][0]) - 6  # the small image's prompt
    assert text == text_tokens
    assert baseline["flops"]["total"] == pytest.approx(counted_flops(qwen, items), abs=1)
    assert pruned["flops"]["total"] == pytest.approx(counted_flops(qwen, items, keep=4), abs=1)
    assert pruned["flops_ratio"] < 1
    config = qwen.config.text_config
    per_token = 2 * config.num_key_value_heads * 16 * 2  # bf16 keys and values; head_dim 16 in every tiny family
    assert pruned["kv_cache_bytes"] == per_token * 3 * (text + 4)


def tokens_per_layer(qwen: QwenVLBackbone, items) -> list[list[int]]:
    """Per item, the tokens each decoder layer of the LLM receives in one prefill (hooks on the layers)."""
    seen, hooks = [], [layer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True) for layer in qwen.llm_layers]
    per_item = []
    try:
        for item in items:
            seen.clear()
            with torch.no_grad():
                qwen.forward(**encode_samples(qwen, [item]), logits_to_keep=1)
            per_item.append(list(seen))
    finally:
        for hook in hooks:
            hook.remove()
    return per_item


def test_eval_measures_the_two_stage_pruner_per_image(tiny_qwen_dir, vqa_files, tmp_path, capsys):
    qwen = QwenVLBackbone.from_pretrained(tiny_qwen_dir)
    TwoStagePruner(tiny_config(tiny_qwen_dir, SETTINGS, pruner={"pruning_layers": [1]}), qwen).save_pretrained(
        tmp_path / "pruner")
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tiny_qwen_dir), "--pruner", str(tmp_path / "pruner"), "--centres", "0.5",
                 "--method", "random", "--site", "llm.0", "--budget", "4", *vqa_files, "--max-new-tokens", "1",
                 "--timing-samples", "0", "--json", "--out", str(out)]) == 0
    baseline, _, learned = json.loads(capsys.readouterr().out)
    assert (learned["method"], learned["site"], learned["budget"]) == ("two_stage", "llm.0", "0.5")
    merger, head = learned["visual_tokens_per_stage"]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()[1:]]
    kept = [r["kept"] for r in records if r["run"] == "two_stage@llm.0:0.5"]
    assert [k[merger] for k in kept] == [8, 3, 8, 3]  # half of each image's 16 or 6 tokens
    assert all(0 < k[head] < k[merger] for k in kept)
    assert learned["visual_tokens_per_stage"] == {merger: 5.5, head: sum(k[head] for k in kept) / 4}
    assert learned["visual_tokens_kept"] == 5.5

    pruner = TwoStagePruner.from_pretrained(tmp_path / "pruner", qwen)
    items = load_llava_eval(*(vqa_files[i] for i in (1, 3, 5)))
    handle = pruner.attach(qwen, "hard", centres="0.5")
    try:
        measured = tokens_per_layer(qwen, items)  # what the LLM's layers really received
    finally:
        handle.detach()
    assert learned["tokens_per_llm_layer"] == [sum(column) / len(items) for column in zip(*measured)]
    assert baseline["tokens_per_llm_layer"] == [sum(column) / len(items) for column in zip(*tokens_per_layer(
        qwen, items))]
    assert learned["flops"]["vision"] == baseline["flops"]["vision"] and learned["flops_ratio"] < 1
    assert learned["flops"]["llm"] < baseline["flops"]["llm"]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_tiny_qwen("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


@pytest.mark.parametrize("args,needle", [
    (["--method", "visionzip", "--budget", "0.5"], "visionzip"),
    (["--method", "random", "--site", "vision.1", "--budget", "0.5"], "site vision.1 does not exist on the Qwen-VL"),
    (["--method", "prumerge", "--budget", "0.5"], "prumerge needs"),
    (["--method", "random", "--site", "llm.0", "--budget", "10"], "gives 6 visual tokens, fewer than the budget of 10"),
])
def test_what_the_qwen_backbone_refuses_is_one_line(qwen2_dir, vqa_files, capsys, args, needle):
    assert main(["eval", "--model", str(qwen2_dir), *vqa_files, "--timing-samples", "0", "--json", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("tokensieve: error: ") and needle in err


def test_kept_token_pictures_draw_each_image_on_its_own_grid(qwen2_dir, vqa_files, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(qwen2_dir), *vqa_files, "--method", "random", "--site", "llm.0",
                 "--budget", "2", "--kept-examples", "2", "--timing-samples", "0", "--max-new-tokens", "1",
                 "--out", str(out)]) == 0
    pruned = load_report(out)["rows"][1]
    kept = pruned["kept_tokens"]["stages"]["random@llm.0:2"]
    assert pruned["kept_tokens"]["ids"] == ["q0", "q1"] and [len(k) for k in kept] == [2, 2]
    assert all(0 <= p < n for k, n in zip(kept, (16, 6)) for p in k)  # indices into each image's own tokens
    views = example_views(QwenVLBackbone.from_pretrained(qwen2_dir), load_llava_eval(
        *(vqa_files[i] for i in (1, 3, 5)))[:2])
    assert [(v.image.shape[:2], v.grid) for v in views] == [((112, 112), (4, 4)), ((56, 84), (2, 3))]
    assert all((out / f"kept_tokens/item_q{i}.png").stat().st_size > 0 for i in (0, 1))


def test_the_backbone_is_picked_by_the_checkpoints_model_type(qwen2_dir, tiny_llava_dir, tmp_path):
    assert type(load_backbone(qwen2_dir)) is QwenVLBackbone
    assert type(load_backbone(tiny_llava_dir)) is LlavaBackbone
    BertConfig().save_pretrained(tmp_path)
    with pytest.raises(TokensieveError, match="is a 'bert' model; tokensieve loads LLaVA"):
        load_backbone(tmp_path)


@pytest.fixture(scope="module")
def qwen_testbed_dir(tmp_path_factory):
    return save_untrained_qwen_testbed(tmp_path_factory.mktemp("qwen_testbed"))


def test_the_qwen_synthetic_scenes_are_the_testbeds_four_sizes(qwen_testbed_dir, qwen2_dir):
    assert scene_spec_for(QwenVLBackbone.from_pretrained(qwen_testbed_dir)) == QWEN_SCENES
    assert scene_spec_for(QwenVLBackbone.from_pretrained(qwen2_dir)).sizes == ()  # at most 64 tokens: one square


def test_the_object_oracle_keeps_object_cells_of_each_images_own_grid():
    scenes = heldout_samples(20, spec=QWEN_SCENES)
    assert {s.grid for s in scenes} == {(8, 8), (8, 10), (10, 9), (10, 10)}
    for scene in scenes:
        objects = set(scene.object_patches)  # make_sample's cells, row-major over the scene's own columns
        for budget, count in (("0.05", round(0.05 * scene.grid[0] * scene.grid[1])), ("4", 4)):
            kept = per_image_oracle(budget)(scene).tolist()
            assert kept == sorted(kept) and set(kept) <= objects and len(kept) == min(count, len(objects))
            cols = scene.grid[1]
            owners = {next(i for i, o in enumerate(scene.objects) if k in o.patch_indices(cols)) for k in kept}
            assert len(owners) == min(len(kept), len(scene.objects))  # one per object before a second
    small = next(s for s in scenes if s.grid == (8, 8))
    with pytest.raises(TokensieveError, match="gives 64 visual tokens, fewer than the budget"):
        per_image_oracle("70")(small)


def test_eval_adds_the_object_oracle_per_image_on_qwen(qwen_testbed_dir, capsys):
    assert main(["eval", "--model", str(qwen_testbed_dir), "--method", "random", "--site", "llm.0", "--budget", "0.5",
                 "--oracle", "--samples", "6", "--timing-samples", "1", "--json"]) == 0
    baseline, _, oracle = json.loads(capsys.readouterr().out)
    scenes = heldout_samples(6, spec=QWEN_SCENES)
    tokens = [s.grid[0] * s.grid[1] for s in scenes]
    assert len(set(tokens)) > 1 and baseline["visual_tokens_kept"] == round(sum(tokens) / 6, 2)
    kept = [min(round(0.5 * n), len(s.object_patches)) for n, s in zip(tokens, scenes)]
    assert (oracle["method"], oracle["site"], oracle["budget"]) == ("object_oracle", "llm.0", "0.5")
    assert oracle["visual_tokens_kept"] == round(sum(kept) / 6, 2)
    text = baseline["tokens_per_llm_layer"][0] - baseline["visual_tokens_kept"]
    assert oracle["tokens_per_llm_layer"] == [round(text + sum(kept) / 6, 2)] * 2
    assert oracle["flops"]["vision"] == baseline["flops"]["vision"] and oracle["flops_ratio"] < 1
    assert oracle["ttft_ms"] > 0


def test_an_oracle_count_above_the_smallest_image_is_one_line_before_model_work(qwen_testbed_dir, capsys):
    assert main(["eval", "--model", str(qwen_testbed_dir), "--method", "random", "--site", "llm.0", "--budget", "70",
                 "--oracle", "--samples", "7", "--timing-samples", "0", "--json"]) == 2  # item 6 is 8x8
    err = capsys.readouterr().err
    assert err.startswith("tokensieve: error: ") and len(err.strip().splitlines()) == 1
    assert "gives 64 visual tokens, fewer than the budget" in err


@pytest.mark.parametrize(("site", "budget", "by"), [("llm.0", "0.5", "tokens"), ("llm.1", "6", "tokens"),
                                                    ("llm.0", "0.9", "flops"), ("llm.2", "0.95", "flops")])
def test_match_plans_a_share_of_each_image_at_the_cost_the_run_measures(qwen2_dir, vqa_files, capsys, site, budget,
                                                                         by):
    assert main(["eval", "--model", str(qwen2_dir), *vqa_files, "--method", "random", "--site", site, "--budget",
                 budget, "--match", by, "--max-new-tokens", "1", "--timing-samples", "0", "--json"]) == 0
    baseline, row = json.loads(capsys.readouterr().out)
    matched = row["matched"]
    assert isinstance(row["budget"], float) and 0 < row["budget"] <= 1  # a share of each image's 16 or 6 tokens
    if by == "tokens":  # a count, or a share of the mean 11 visual tokens
        assert matched["target"] == (int(budget) if budget.isdigit() else round(float(budget) * 11))
        assert matched["planned"] == pytest.approx(row["visual_tokens_mean_llm"], abs=0.01)
    else:
        assert matched["target"] == pytest.approx(float(budget) * baseline["flops"]["total"], abs=0.01)
        assert matched["planned"] == pytest.approx(row["flops"]["total"], abs=2)  # means rounded to whole FLOPs
