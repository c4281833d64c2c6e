"""Reference-parity fixtures: numbers produced by running a method's released code.

Each fixture is a pair in ``tests/fixtures/parity/``: ``<name>.safetensors`` (the seeded input
tensors and the reference's outputs) and ``<name>.json`` (where the numbers came from: the
authors' ``repository``, ``commit`` and ``file``, the ``function`` run, the paper
``configuration``, how the reference was driven, and what each tensor means). The drivers run
outside this project, on a fetched copy of the authors' repository; none of their code is here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parity"
REQUIRED = ("repository", "commit", "file", "function", "configuration", "driver", "tensors")


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of fixture ``name``; the metadata must say where it came from."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise AssertionError(f"parity fixture {name}: metadata lacks {', '.join(missing)}")
    if len(meta["commit"]) != 40:
        raise AssertionError(f"parity fixture {name}: commit {meta['commit']!r} is not a full hash")
    tensors = load_file(str(FIXTURES / f"{name}.safetensors"))
    undescribed = sorted(set(tensors) - set(meta["tensors"]))
    if undescribed:
        raise AssertionError(f"parity fixture {name}: tensors {undescribed} are not described")
    return tensors, meta


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Every element within ``rtol`` of the reference, relative to the reference's largest magnitude
    (so values near zero are not held to a relative bound they cannot meet)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-12)
    worst = float((actual - expected).abs().max() / scale)
    assert worst <= rtol, f"largest difference {worst:.2e} of the reference's scale exceeds {rtol:.0e}"
