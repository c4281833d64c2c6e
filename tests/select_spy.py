"""Watching how a registered method is called: the rows each call of its ``select`` is given."""

from __future__ import annotations

from tokensieve.methods import create_method


def rows_per_call(monkeypatch, method: str) -> list[int]:
    """A list that grows, at every later call of ``method``'s ``select`` (any instance), by the number of
    rows that call was given; ``monkeypatch`` undoes it after the test."""
    calls: list[int] = []
    chooser = type(create_method(method))
    select = chooser.select

    def counted(self, inputs):
        calls.append(len(inputs.tokens))
        return select(self, inputs)
    monkeypatch.setattr(chooser, "select", counted)
    return calls
