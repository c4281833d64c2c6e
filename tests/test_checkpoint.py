"""Atomic writes never leave a half-written checkpoint."""

from __future__ import annotations

import pytest
import torch

from tokensieve.checkpoint import atomic_torch_save


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)
    atomic_torch_save({"step": 2}, path)
    assert torch.load(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)

    def broken_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
