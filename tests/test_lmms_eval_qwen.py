"""The lmms-eval model on the tiny random Qwen-VL checkpoints of every family, through lmms-eval's own
``simple_evaluate`` and a local task this test writes: documents with images of different sizes and
one with two images get the answers the adapter's own ``generate`` gives with the same method
attached, and so do documents with a video file (read with PyAV, 8 frames) beside an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmms_tasks import TASK, direct_answers, evaluate
from PIL import Image
from random_media import random_video, write_video
from tiny_qwen import FAMILIES, image, save_tiny_qwen

from tokensieve.attach import attach
from tokensieve.backbones.chat_format import prompt_text
from tokensieve.backbones.hf_qwen import QwenVLBackbone
from tokensieve.errors import TokensieveError
from tokensieve.integrations.lmms_eval_model import read_video

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(path) for path in doc["images"]]


def doc_to_video(doc):
    return [doc["video"], *[Image.open(path) for path in doc["images"]]]  # a video task gives the file's path


def doc_to_text(doc):
    return doc["question"]
'''

DOCS = [("what is the colour ?", ["big"]), ("what shape is left ?", ["small"]),
        ("what shape is left and right ?", ["small", "big"])]


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_dir(request, tmp_path_factory):
    """A tiny random Qwen-VL of each family; seed 2: its greedy answers are words (seed 0's Qwen2-VL ends at once)."""
    return save_tiny_qwen(request.param, tmp_path_factory.mktemp(request.param), seed=2)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three questions about images of two sizes (one with two images), and a video task: the same
    questions about a 12-frame clip, then the images."""
    folder = tmp_path_factory.mktemp("lmms_qwen_tasks")
    write_video(folder / "clip.mp4", random_video(12, 56, 84, seed=3))
    rows = []
    for i, (question, sizes) in enumerate(DOCS):
        paths = []
        for j, size in enumerate(sizes):
            paths.append(str(folder / f"{i}_{j}.png"))
            image(size, seed=10 * i + j).save(paths[-1])
        rows.append({"question": question, "answer": "red", "images": paths, "video": str(folder / "clip.mp4")})
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(UTILS)
    for name, visual in (("tiny_qwen_vqa", "doc_to_visual"), ("tiny_qwen_video", "doc_to_video")):
        (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=folder / "test.jsonl", visual=visual,
                                                                 max_new_tokens=4))
    return folder


def documents_answers(qwen: QwenVLBackbone, task_dir: Path, handle) -> list[str]:
    """Each document's answer from ``qwen.generate`` alone, with ``handle`` attached (detached after)."""
    docs = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()]
    prompts = [([Image.open(path).convert("RGB") for path in doc["images"]],
                prompt_text(qwen, doc["question"], len(doc["images"]))) for doc in docs]
    return direct_answers(qwen, prompts, handle, max_new_tokens=4)


def test_generate_until_on_a_qwen_checkpoint_equals_the_adapters_generate(qwen_dir, task_dir):
    args = f"pretrained={qwen_dir},method=divprune,budget=0.5,site=llm.0"
    result = evaluate(task_dir, "tiny_qwen_vqa", args)
    samples = sorted(result["samples"]["tiny_qwen_vqa"], key=lambda s: s["doc_id"])
    answers = [s["filtered_resps"][0] for s in samples]
    assert all(isinstance(a, str) and a for a in answers)  # random weights: words, not an answer
    qwen = QwenVLBackbone.from_pretrained(qwen_dir)
    assert answers == documents_answers(qwen, task_dir, attach(qwen, "divprune", 0.5, site="llm.0"))


def test_a_video_file_is_read_and_answered_as_the_adapters_generate(qwen_dir, task_dir):
    args = f"pretrained={qwen_dir},method=divprune,budget=0.5,site=llm.0,frames=8"
    result = evaluate(task_dir, "tiny_qwen_video", args)
    answers = [s["filtered_resps"][0] for s in sorted(result["samples"]["tiny_qwen_video"], key=lambda s: s["doc_id"])]
    qwen = QwenVLBackbone.from_pretrained(qwen_dir)
    video = read_video(str(task_dir / "clip.mp4"), 8)
    assert video.frames.shape == (8, 56, 84, 3) and list(video.metadata.frames_indices) == [0, 1, 3, 4, 6, 7, 9, 10]
    handle = attach(qwen, "divprune", 0.5, site="llm.0")
    try:
        docs = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()]
        assert len(answers) == len(docs) == 3
        for answer, doc in zip(answers, docs):
            images = [Image.open(path).convert("RGB") for path in doc["images"]]
            batch = qwen.processor(images=images, videos=[video.frames], video_metadata=[video.metadata],
                                   do_sample_frames=False,
                                   text=[prompt_text(qwen, doc["question"], ["video", *["image"] * len(images)])],
                                   return_tensors="pt")
            new = qwen.generate(**batch, max_new_tokens=4, do_sample=False)
            assert batch["video_grid_thw"][0, 0] == 4  # 8 frames: 4 temporal patches, none sampled again
            assert answer == qwen.processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
    finally:
        handle.detach()


def test_a_short_clip_is_read_whole_and_a_missing_file_is_one_line(tmp_path):
    clip = write_video(tmp_path / "short.mp4", random_video(3, 56, 84))
    video = read_video(str(clip), 8)
    assert video.frames.shape[0] == 3 and list(video.metadata.frames_indices) == [0, 1, 2]
    with pytest.raises(TokensieveError, match=r"^doc 3: the video .*gone.mp4 is not a file$"):
        read_video(str(tmp_path / "gone.mp4"), 8, "doc 3")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(TokensieveError, match=r"^doc 3: cannot read the video .*broken.mp4: [^\n]*$"):
        read_video(str(tmp_path / "broken.mp4"), 8, "doc 3")


def test_loglikelihood_on_qwen_scores_the_continuation_after_the_images(qwen_dir):
    import torch
    from lmms_eval.api.instance import Instance

    from tokensieve.integrations.lmms_eval_model import TokensieveModel

    model = TokensieveModel(pretrained=str(qwen_dir), batch_size=2)  # unpruned
    docs = [{"question": q, "images": [image(size, seed=i) for size in sizes]} for i, (q, sizes) in enumerate(DOCS)]
    model.task_dict = {"t": {"test": docs}}
    requests = [Instance(request_type="loglikelihood", arguments=(doc["question"], " red", lambda d: d["images"], i,
                                                                   "t", "test"), idx=0,
                         metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]
    got = model.loglikelihood(requests)
    qwen = model.backbone
    for (loss, greedy), doc in zip(got, docs):
        text = prompt_text(qwen, doc["question"], len(doc["images"])) + " red"
        batch = qwen.processor(images=doc["images"], text=[text], return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(qwen.forward(**batch).logits[0, -2], -1)
        red = batch["input_ids"][0, -1]
        assert loss == pytest.approx(float(-logp[red]), abs=1e-4) and greedy == bool(logp.argmax() == red)
