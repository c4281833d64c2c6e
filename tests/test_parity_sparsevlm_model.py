"""SparseVLM v1 in a whole model against its released code (Gumpest/SparseVLMs@b72c5d6,
``LlamaDynamicvitModel.forward`` of modelling_sparse_llama.py): a tiny 32-layer Llama at the 192
setting, pruning after layers 2, 6, 15 and 19 (our llm.3/7/16/20), with recycled tokens inserted
after the kept ones and positions renumbered. The reference draws its density noise from the
global RNG; the fixture stores it, and this test feeds it in."""

from __future__ import annotations


import pytest
import torch
from parity_fixtures import assert_close_relative, load_fixture
from released_llama import released_model_as_llava

from tokensieve.attach import attach
from tokensieve.methods import sparsevlm


@pytest.fixture(scope="module")
def forward():
    return load_fixture("sparsevlm_forward")


def test_a_whole_prefill_keeps_and_recycles_what_the_released_code_does(forward, monkeypatch):
    tensors, meta = forward
    spec = meta["cases"]["prefill_192"]
    backbone, ids, image = released_model_as_llava(tensors)
    monkeypatch.setattr(backbone, "encode_images", lambda pixel_values: image)
    noises = iter(tensors[f"noise_layer{k}"] for k in spec["pruning_layers"])
    step = sparsevlm.sparsevlm_step
    monkeypatch.setattr(sparsevlm, "sparsevlm_step",  # each stage draws the reference's noise
                        lambda *args: step(*args[:-1], lambda n, stored=next(noises): stored.reshape(-1)[:n]))
    final = []
    backbone.language_model.norm.register_forward_hook(lambda _m, _a, out: final.append(out))
    handle = attach(backbone, "sparsevlm", 192)
    assert [st.site for st in handle.stages] == ["llm.3", "llm.7", "llm.16", "llm.20"]
    with torch.no_grad():
        backbone.forward(ids, torch.ones_like(ids), torch.zeros(1, 3, 48, 48))
    handle.detach()
    counts = [handle.last_counts[str(st)] for st in handle.stages]
    assert [before for before, _ in counts] == spec["image_run_per_stage"]
    run = torch.arange(576)  # the image run entering the stage: patch indices, -3 for recycled tokens
    for st, layer in zip(handle.stages, spec["pruning_layers"]):
        ours = handle.last_kept[str(st)][0]
        kept = tensors[f"kept_layer{layer}"]  # the reference's, into the run as it was then
        assert ours[:len(kept)].tolist() == run[kept].tolist()
        assert bool((ours[len(kept):] == -3).all())  # then the recycled tokens, after the kept ones
        run = ours
    assert final[0].shape[1] == spec["output_length"]
    # float32 drift over 32 layers: the prefix, which no stage touches, differs by 7.5e-6 already
    assert_close_relative(final[0], tensors["last_hidden"], rtol=1e-4)
