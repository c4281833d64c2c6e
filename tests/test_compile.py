"""Pruned prefill under ``torch.compile`` (``bench speed --compile``): the compiled tiny LLaVA gives
the eager logits and keeps the same token counts, the pruning hooks traced with the forwards."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters

from tokensieve.attach import attach
from tokensieve.cli import main
from tokensieve.errors import TokensieveError
from tokensieve.evaluate.compiled import compiled_forwards
from tokensieve.evaluate.speed import BenchShape, speed_benchmark

CASES = [("fastv", "llm.2"), ("divprune", "llm.0"), ("visionzip", "projector")]


def _eager_and_compiled(backbone, batch, method: str, site: str, backend: str):
    """Logits ``(B, L', vocab)`` and ``handle.last_counts`` of an eager then a compiled pruned pass."""
    handle = attach(backbone, method, 0.5, site=site, mode="hard")
    try:
        with torch.no_grad():
            eager, eager_counts = backbone.forward(**batch).logits, dict(handle.last_counts)
            counters["stats"].clear()
            with compiled_forwards((backbone.vision_tower, backbone.projector, backbone.model), backend):
                compiled = backbone.forward(**batch).logits
            assert counters["stats"]["unique_graphs"] > 0  # it ran compiled, not eager
            return eager, eager_counts, compiled, dict(handle.last_counts)
    finally:
        handle.detach()


@pytest.mark.parametrize("method,site", CASES)
def test_compiled_pruned_model_gives_the_eager_logits(backbone, batch, method, site):
    # aot_eager traces through dynamo and AOTAutograd as inductor does, with no C compile: fast.
    eager, eager_counts, compiled, counts = _eager_and_compiled(backbone, batch, method, site, "aot_eager")
    assert counts == eager_counts
    assert compiled.shape == eager.shape
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")), reason="inductor on a CPU needs a C compiler")
def test_inductor_compiled_pruned_model_gives_the_eager_logits(backbone, batch):
    eager, eager_counts, compiled, counts = _eager_and_compiled(backbone, batch, "divprune", "llm.0", "inductor")
    assert counts == eager_counts
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_a_backend_that_cannot_compile_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/g++"))  # no C compiler
    micro = BenchShape(llm_layers=2, llm_hidden=32, llm_heads=2, llm_intermediate=64, vision_layers=1,
                       vision_hidden=16, vision_heads=2, image_size=56, patch_size=14, text_tokens=8, vocab=100)
    with pytest.raises(TokensieveError, match="^--compile: torch.compile's inductor backend cannot compile here: ") as err:
        speed_benchmark(micro, ("divprune",), (0.5,), repeats=1, progress=False, compile_backend="inductor")
    assert "\n" not in str(err.value)


def test_an_unknown_backend_is_refused_in_one_line(capsys):
    assert main(["bench", "speed", "--compile", "--compile-backend", "nosuch"]) == 2
    assert capsys.readouterr().err == ("tokensieve: error: --compile-backend nosuch: not a torch.compile backend "
                                       "(e.g. inductor, cudagraphs, aot_eager)\n")


def test_fastv_in_the_llm_compiles_to_one_graph(backbone, batch):
    """Nothing the engine does inside the LLM breaks the graph: FastV at llm.2 (its capture of
    layer 1's attention, the drop before layer 2, the gathered positions and mask) compiles with
    the model's forward into a single graph."""
    handle = attach(backbone, "fastv", 0.5, site="llm.2", mode="hard")
    try:
        with torch.no_grad():
            backbone.forward(**batch)  # the stage's first pass checks values (a graph break by design)
            counters.clear()
            with compiled_forwards((backbone.model,), "aot_eager"):
                backbone.forward(**batch)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        handle.detach()
