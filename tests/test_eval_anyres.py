"""`tokensieve eval` and the lmms-eval model on the tiny random LLaVA-NeXT, LLaVA-OneVision and NeXT-Video checkpoints
(accuracy is meaningless on random weights): the pipeline runs end to end on images of three aspect ratios,
each giving its own base, crops and newlines; the token counts of its rows are those the LLM's layers
receive in real forward passes, its FLOPs torch's FLOP counter's; what cannot work yet is one line."""

from __future__ import annotations

import json

import pytest
import tiny_llava_next
import tiny_next_video
import tiny_onevision
import torch
from lmms_tasks import TASK, direct_answers, evaluate
from PIL import Image
from random_media import random_video, write_video
from torch.utils.flop_counter import FlopCounterMode

from tokensieve.attach import attach
from tokensieve.backbones.chat_format import encode_samples, prompt_text
from tokensieve.backbones.hf_llava_next import LlavaNextBackbone
from tokensieve.backbones.hf_llava_onevision import LlavaOnevisionBackbone
from tokensieve.backbones.llava_prompt import prompt as llava_prompt
from tokensieve.backbones.load import load_backbone
from tokensieve.cli import main
from tokensieve.data.vqa_files import load_llava_eval
from tokensieve.errors import TokensieveError
from tokensieve.integrations.lmms_eval_model import read_video
from tokensieve.pruner.placement import placement

QUESTION = "what is the colour ?"  # one question: every prompt has the median text length
# Per family: its tiny module, and each image's (base + crop tokens, newlines) from the modules' docstrings.
FAMILIES = {"next": (tiny_llava_next, {"wide": (48, 4), "square": (80, 8), "tall": (48, 8)}),
            "onevision": (tiny_onevision, {"wide": (48, 4), "square": (41, 5), "long": (43, 3)}),
            "next_video": (tiny_next_video, {"wide": (48, 4), "square": (80, 8), "tall": (48, 8)})}
FOLDERS = {"next": "tiny_llava_next_dir", "onevision": "tiny_onevision_dir", "next_video": "tiny_next_video_dir"}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    """``(checkpoint folder, tiny module, image sizes)`` of each family."""
    folder = request.getfixturevalue(FOLDERS[request.param])
    module, sizes = FAMILIES[request.param]
    return folder, module, sizes


@pytest.fixture
def vqa_files(family, tmp_path):
    """One item per image size of the family, in LLaVA's evaluation layout."""
    _, module, sizes = family
    return write_vqa_files(module, sizes, tmp_path)


def write_vqa_files(module, sizes: dict, tmp_path) -> list[str]:
    """One item per image size of a family's tiny ``module`` in ``tmp_path``; eval's arguments naming them."""
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate(sizes):
        module.image(size, seed=i).save(images / f"{i}.png")
    questions, answers = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"{i}.png", "text": QUESTION}) + "\n"
                                 for i in range(len(sizes))))
    answers.write_text("".join(json.dumps({"question_id": f"q{i}", "answer": "red"}) + "\n" for i in range(len(sizes))))
    return ["--questions", str(questions), "--images", str(images), "--answers", str(answers)]


def measured(backbone, items, method: str | None = None) -> tuple[list[list[int]], list[int]]:
    """Per item, the positions each LLM decoder layer receives in one prefill (hooks on the layers), and
    torch's FLOP count of that prefill (eager attention, the last position's logits, as generate's
    prefill), with ``method`` attached at ``llm.0`` (budget 0.25) or unpruned."""
    for config in (backbone.config, backbone.config.vision_config, backbone.config.text_config):
        config._attn_implementation = "eager"  # torch's counter skips the CPU SDPA kernel
    seen, hooks = [], [layer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True) for layer in backbone.llm_layers]
    handle = None if method is None else attach(backbone, method, "0.25", site="llm.0")
    tokens, flops = [], []
    try:
        for item in items:
            seen.clear()
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                backbone.forward(**encode_samples(backbone, [item]), logits_to_keep=1)
            tokens.append(list(seen))
            flops.append(counter.get_total_flops())
    finally:
        for hook in hooks:
            hook.remove()
        if handle is not None:
            handle.detach()
    return tokens, flops


def mean_columns(per_item: list[list[int]]) -> list[float]:
    return [sum(column) / len(per_item) for column in zip(*per_item)]


def test_eval_runs_on_anyres_checkpoints_with_the_costs_of_real_forward_passes(family, vqa_files, tmp_path, capsys):
    folder, _, sizes = family
    out = tmp_path / "report"
    assert main(["eval", "--model", str(folder), "--method", "random,divprune", "--site", "llm.0", "--budget", "0.25",
                 *vqa_files, "--max-new-tokens", "2", "--timing-samples", "1", "--json", "--out", str(out)]) == 0
    baseline, rand, divprune = rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["none", "random", "divprune"]
    assert all(r["ttft_ms"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    tokens = [n for n, _ in sizes.values()]
    kept = [round(0.25 * n) for n in tokens]  # a ratio: that share of each image's base and crop tokens
    assert baseline["visual_tokens_kept"] == pytest.approx(sum(tokens) / 3, abs=0.01)
    assert rand["visual_tokens_kept"] == divprune["visual_tokens_kept"] == pytest.approx(sum(kept) / 3, abs=0.01)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()[1:]]
    assert [r["kept"] for r in records if r["run"] == "random@llm.0:0.25"] == [{"random@llm.0:0.25": k} for k in kept]

    backbone = load_backbone(folder)
    items = load_llava_eval(*(vqa_files[i] for i in (1, 3, 5)))
    plain_tokens, plain_flops = measured(backbone, items)
    pruned_tokens, pruned_flops = measured(backbone, items, "random")
    text = json.loads((out / "report.json").read_text())["meta"]["text_tokens_for_flops"]
    assert plain_tokens == [[text + n + newlines] * 3 for n, newlines in sizes.values()]  # newlines enter the LLM
    assert baseline["tokens_per_llm_layer"] == pytest.approx(mean_columns(plain_tokens), abs=0.01)
    assert rand["tokens_per_llm_layer"] == divprune["tokens_per_llm_layer"] == pytest.approx(
        mean_columns(pruned_tokens), abs=0.01)
    assert baseline["flops"]["total"] == pytest.approx(sum(plain_flops) / 3, abs=1)
    assert rand["flops"]["total"] == pytest.approx(sum(pruned_flops) / 3, abs=1)  # random's choice costs no matmul
    assert rand["flops"]["vision"] == baseline["flops"]["vision"] and rand["flops_ratio"] < 1
    config = backbone.config.text_config
    per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2  # bf16 K, V
    assert rand["kv_cache_bytes"] == pytest.approx(per_token * 3 * sum(map(sum, pruned_tokens)) / 9, abs=1)


@pytest.mark.parametrize("args,needle", [
    (["--match", "tokens", "--method", "random", "--budget", "0.5"], "--match on LLaVA-"),
    (["--method", "random", "--budget", "0.5", "--kept-examples", "2"], "--kept-examples on LLaVA-"),
    (["--method", "random", "--budget", "0.5", "--oracle"], "--oracle needs the synthetic set"),
])
def test_what_eval_refuses_on_anyres_is_one_line(family, vqa_files, tmp_path, capsys, args, needle):
    out = ["--out", str(tmp_path / "out")] if "--kept-examples" in args else []
    assert main(["eval", "--model", str(family[0]), *vqa_files, "--timing-samples", "0", "--json", *out,
                 *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("tokensieve: error: ") and needle in err


@pytest.mark.parametrize("args,needle", [  # the wide image: a base and 1 x 2 crops
    (["--method", "random", "--site", "llm.0", "--split", "even", "--budget", "2"], "split 'even' needs one token"),
    (["--method", "hired", "--budget", "2"], "HiRED splits the budget over them"),
])
def test_a_budget_below_one_token_per_part_is_one_line_from_the_cli(tiny_llava_next_dir, tmp_path, capsys, args,
                                                                    needle):
    files = write_vqa_files(*FAMILIES["next"], tmp_path)
    assert main(["eval", "--model", str(tiny_llava_next_dir), *files, "--timing-samples", "0", "--json", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("tokensieve: error: ") and needle in err


def test_eval_splits_the_budget_over_base_and_crops_as_asked(tiny_llava_next_dir, tmp_path, capsys, monkeypatch):
    from tokensieve.evaluate import accuracy

    splits = []
    def spy(*args, split, **kwargs):
        splits.append(split)
        return attach(*args, split=split, **kwargs)

    monkeypatch.setattr(accuracy, "attach", spy)
    files = write_vqa_files(*FAMILIES["next"], tmp_path)
    assert main(["eval", "--model", str(tiny_llava_next_dir), *files, "--method", "divprune", "--site", "llm.0",
                 "--budget", "6", "--split", "even", "--timing-samples", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["visual_tokens_kept"] == 6  # a count per image, shared by its parts
    assert splits and set(splits) == {"even"}


def test_the_synthetic_set_and_the_pruner_are_refused_on_anyres(family, capsys):
    assert main(["eval", "--model", str(family[0]), "--method", "random", "--budget", "0.5", "--json"]) == 2
    assert "give a real set" in capsys.readouterr().err
    with pytest.raises(TokensieveError, match="the two-stage pruner has no placement on LLaVA-"):
        placement(load_backbone(family[0]))


def test_next_is_loaded_by_model_type_and_asked_in_its_chat_format(tiny_llava_next_dir, tiny_onevision_dir):
    nxt, onevision = load_backbone(tiny_llava_next_dir), load_backbone(tiny_onevision_dir)
    assert type(nxt) is LlavaNextBackbone and type(onevision) is LlavaOnevisionBackbone
    assert prompt_text(nxt, QUESTION) == llava_prompt(QUESTION)  # no chat template: LLaVA-1.5's (Vicuna's) format
    nxt.processor.chat_template = "[INST] {% for m in messages %}{% for c in m['content'] %}" \
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} [/INST]"
    assert prompt_text(nxt, QUESTION) == f"[INST] <image>\n{QUESTION} [/INST]"  # Mistral's, from its template
    for text in (f"{QUESTION} ASSISTANT:", f"{QUESTION} [/INST]", f"{QUESTION}\nassistant\n"):  # Vicuna, Mistral, ChatML
        assert nxt.answer_cue.sub("", text).strip() == QUESTION  # what question-aware methods are given


UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"])]


def doc_to_text(doc):
    return doc["question"]
'''


def test_lmms_eval_on_anyres_equals_the_adapters_generate(family, tmp_path):
    folder, module, sizes = family
    rows = []
    for i, size in enumerate(sizes):
        module.image(size, seed=i).save(tmp_path / f"{i}.png")
        rows.append({"question": QUESTION, "answer": "red", "image": str(tmp_path / f"{i}.png")})
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "utils.py").write_text(UTILS)
    (tmp_path / "tiny_anyres_vqa.yaml").write_text(TASK.format(name="tiny_anyres_vqa", data=tmp_path / "test.jsonl",
                                                               visual="doc_to_visual", max_new_tokens=3))
    result = evaluate(tmp_path, "tiny_anyres_vqa", f"pretrained={folder},method=divprune,budget=0.5,site=llm.0")
    answers = [s["filtered_resps"][0] for s in sorted(result["samples"]["tiny_anyres_vqa"], key=lambda s: s["doc_id"])]
    backbone = load_backbone(folder)
    prompts = [([Image.open(r["image"]).convert("RGB")], prompt_text(backbone, QUESTION)) for r in rows]
    assert answers == direct_answers(backbone, prompts, attach(backbone, "divprune", 0.5, site="llm.0"), 3)


VIDEO_UTILS = """
def doc_to_visual(doc):
    return [doc["video"]]  # what lmms-eval's video tasks give: the file's path


def doc_to_text(doc):
    return doc["question"]
"""


@pytest.mark.parametrize("folder", ["tiny_onevision_dir", "tiny_next_video_dir", "tiny_llava_next_dir"])
def test_lmms_eval_reads_a_video_file_on_the_families_that_take_videos(folder, tmp_path, request):
    folder = request.getfixturevalue(folder)
    write_video(tmp_path / "clip.mp4", random_video(12, 28, 28, seed=4))
    rows = [{"question": q, "answer": "red", "video": str(tmp_path / "clip.mp4")} for q in (QUESTION, "what happens ?")]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "utils.py").write_text(VIDEO_UTILS)
    (tmp_path / "tiny_video_qa.yaml").write_text(TASK.format(name="tiny_video_qa", data=tmp_path / "test.jsonl",
                                                             visual="doc_to_visual", max_new_tokens=3))
    backbone = load_backbone(folder)
    args = f"pretrained={folder},method=divprune,budget=0.5,site=llm.0,frames=6"
    if not backbone.takes_video:
        with pytest.raises(TokensieveError, match=r"^the LLaVA-NeXT backbone takes images only, not a video$"):
            evaluate(tmp_path, "tiny_video_qa", args)
        return
    result = evaluate(tmp_path, "tiny_video_qa", args)
    answers = [s["filtered_resps"][0] for s in sorted(result["samples"]["tiny_video_qa"], key=lambda s: s["doc_id"])]
    frames = read_video(str(tmp_path / "clip.mp4"), 6).frames
    assert len(answers) == len(rows) == 2
    handle = attach(backbone, "divprune", 0.5, site="llm.0")
    try:
        for answer, row in zip(answers, rows):
            batch = backbone.processor(videos=[frames], text=[prompt_text(backbone, row["question"], ["video"])],
                                       return_tensors="pt")
            new = backbone.generate(**batch, max_new_tokens=3, do_sample=False)
            assert answer == backbone.processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
        assert [len(k[k >= 0]) for k in handle.last_kept[str(handle.stages[0])]] == [12]  # half of 6 x 2 x 2
    finally:
        handle.detach()
