"""The embedded default ships with the package and still answers well (a quick check; the full
report with all targets is `tokensieve testbed eval --json`, see README)."""

from __future__ import annotations

from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.hf_llava import default_model_path
from tokensieve.testbed.evaluate import heldout_samples, predict, summarise


def test_shipped_testbed_loads_and_answers():
    assert (default_model_path() / "model.safetensors").is_file()
    backbone = LlavaBackbone.from_pretrained()
    assert backbone.n_visual_tokens == 100
    samples = heldout_samples(200)
    result = summarise(samples, predict(backbone, samples))
    # Well above the question-only prior (~0.40): the shipped weights are the trained ones.
    assert result["accuracy"] >= 0.75, result
