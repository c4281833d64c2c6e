"""The tiny CLIP: training is resumable and gives the same weights as an uninterrupted run; the
shipped checkpoint is small and well above chance."""

from __future__ import annotations

import json

import pytest

from tokensieve.clip import train as train_module
from tokensieve.clip.shapes import CLASSNAMES
from tokensieve.clip.tiny import load_tiny, shipped_weights
from tokensieve.clip.train import TinyTrainConfig, train_tiny_clip, zero_shot_accuracy
from tokensieve.errors import TokensieveError

CFG = TinyTrainConfig(steps=2, batch_size=8, warmup=1, save_every=1, eval_images=18)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train_tiny_clip(tmp_path / "straight", CFG, progress=False)
    original = train_module.training_pair

    def stop_at_second_step(index, rng):
        if index >= CFG.batch_size:
            raise KeyboardInterrupt
        return original(index, rng)

    monkeypatch.setattr(train_module, "training_pair", stop_at_second_step)
    with pytest.raises(KeyboardInterrupt):
        train_tiny_clip(tmp_path / "resumed", CFG, progress=False)
    assert (tmp_path / "resumed" / "state.pt").is_file() and not (tmp_path / "resumed" / "tiny_clip.safetensors").exists()
    monkeypatch.setattr(train_module, "training_pair", original)
    resumed = train_tiny_clip(tmp_path / "resumed", CFG, progress=False)
    assert resumed.read_bytes() == straight.read_bytes()
    log = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert log["config"]["steps"] == 2 and 0 <= log["zero_shot_accuracy"] <= 1
    with pytest.raises(TokensieveError, match="different configuration"):
        train_tiny_clip(tmp_path / "resumed", TinyTrainConfig(steps=3, batch_size=8), progress=False)


def test_the_shipped_tiny_clip_is_small_and_well_above_chance():
    from dataclasses import asdict

    assert shipped_weights().stat().st_size < 3_000_000
    log = json.loads((shipped_weights().parent / "train_log.json").read_text())
    assert log["config"] == asdict(TinyTrainConfig())  # `tokensieve clip-benchmark train-tiny` remakes it
    model, _, tokenizer = load_tiny()
    assert zero_shot_accuracy(model, tokenizer, 90) > 5 / len(CLASSNAMES)  # chance is 1/18


def test_the_exported_local_dir_loads_through_open_clip_itself(tmp_path):
    import torch
    from PIL import Image

    from tokensieve.optional import import_open_clip
    from tokensieve.clip.export import export_local_dir
    from tokensieve.clip.shapes import shape_image
    from tokensieve.clip.tiny import load_tiny

    export_local_dir(tmp_path / "tiny")
    oc = import_open_clip()
    model, _, preprocess = oc.create_model_and_transforms(f"local-dir:{tmp_path / 'tiny'}")
    ours, our_preprocess, tokenizer = load_tiny()
    image = Image.fromarray(shape_image(0, 0).image)
    assert torch.equal(preprocess(image), our_preprocess(image))
    with torch.no_grad():
        pixels = our_preprocess(image)[None]
        assert torch.equal(model.eval().encode_image(pixels), ours.encode_image(pixels))
        text = tokenizer(["a photo of a red circle."])
        assert torch.equal(model.encode_text(text), ours.encode_text(text))
