"""Accuracy of the testbed with reduction methods attached, next to the unpruned model."""

from __future__ import annotations

from tqdm import tqdm

from tokensieve.attach import attach
from tokensieve.backbones import LlavaBackbone
from tokensieve.testbed.evaluate import heldout_samples, predict, scene_spec_for, summarise


def compare_methods(backbone: LlavaBackbone, methods: list[str], keeps: list[str], mode: str = "hard",
                    site: str | None = None, n_samples: int = 500, batch_size: int = 64,
                    progress: bool = True) -> list[dict]:
    """Rows ``{method, site, keep, visual_tokens_kept, accuracy, per_family}``; the first row
    is the unpruned model (``method`` ``"none"``), measured on the same held-out samples."""
    for name in methods:  # names, sites, budgets and parameters are checked before any model work
        for keep in keeps:
            attach(backbone, name, keep, site=site, mode=mode).detach()
    samples = heldout_samples(n_samples, spec=scene_spec_for(backbone))
    full = summarise(samples, predict(backbone, samples, batch_size=batch_size))
    rows = [{"method": "none", "site": None, "keep": 1.0, "visual_tokens_kept": backbone.n_visual_tokens, **full}]
    cases = [(m, k) for m in methods for k in keeps]
    for name, keep in tqdm(cases, desc="methods x budgets", unit="run", disable=not progress):
        handle = attach(backbone, name, keep, site=site, mode=mode)
        try:
            result = summarise(samples, predict(backbone, samples, batch_size=batch_size))
        finally:
            handle.detach()
        stage = handle.stages[0]
        rows.append({"method": name, "site": stage.site, "keep": keep,
                     "visual_tokens_kept": handle.last_counts[str(stage)][1], **result})
    return rows
