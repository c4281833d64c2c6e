"""The embedded default ships with the package and answers from the image, not the question
alone (the full report with every target is `tokensieve testbed eval --json`, see README)."""

from __future__ import annotations

from tokensieve.backbones import LlavaBackbone
from tokensieve.backbones.hf_llava import default_model_path
from tokensieve.testbed.evaluate import heldout_samples, predict, question_only_predictor, summarise


def test_shipped_testbed_beats_the_question_only_prior():
    assert (default_model_path() / "model.safetensors").is_file()
    backbone = LlavaBackbone.from_pretrained()
    assert backbone.n_visual_tokens == 100
    samples = heldout_samples(300)
    guess = question_only_predictor(3000)
    prior = summarise(samples, [guess(s) for s in samples])["accuracy"]
    result = summarise(samples, predict(backbone, samples))
    assert result["accuracy"] >= prior + 0.4, (result, prior)
    for family in ("color_of_shape", "shape_of_color", "count", "exists"):
        assert result["per_family"][family] >= 0.95, result
    # Spatial questions are learned in part (0.71 on 1,000 samples, 0.80 on these 300; chance
    # is 0.5, see docs/testbed.md): a checkpoint answering them at chance fails here.
    assert result["per_family"]["spatial"] >= 0.65, result
