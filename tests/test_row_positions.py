"""Positions the row-wise stages take without reading values per row: ``trues_first`` gives a mask's True
positions as ``nonzero`` does, and ``units_now`` each row's remaining units as a boolean mask per unit would."""

from __future__ import annotations

import torch

from tokensieve.backbones.qwen_units import units_now
from tokensieve.backbones.stage_plan import EXTRA
from tokensieve.method import VisualUnit
from tokensieve.ops import trues_first


def test_trues_first_gives_the_true_positions_in_order():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        mask = torch.rand(3, 17, generator=generator) < torch.rand(1, generator=generator)
        for row, order in zip(mask, trues_first(mask)):
            count = int(row.sum())
            assert order[:count].tolist() == row.nonzero().flatten().tolist()
            assert order[count:].tolist() == (~row).nonzero().flatten().tolist()


def masked_units(units: list[VisualUnit], origin: torch.Tensor) -> list[VisualUnit]:
    """The reference: each unit's remaining tokens by a boolean mask over ``origin``."""
    out, start = [], 0
    for unit in units:
        inside = origin[(origin >= unit.start) & (origin < unit.start + len(unit.cells))] - unit.start
        if len(inside):
            out.append(VisualUnit(unit.kind, unit.frames, unit.rows, unit.cols, start, inside))
            start += len(inside)
    return out


def test_units_now_is_a_mask_per_unit():
    """Rows of one unit, of several (one of them emptied), with and without made tokens after the rest."""
    generator = torch.Generator().manual_seed(1)
    grids = [("image", 1, 2, 3), ("video", 2, 2, 2), ("image", 1, 3, 3)]
    rows, origins = [], []
    for first, count, made in [(0, 1, 0), (1, 2, 0), (0, 3, 2), (2, 1, 3)]:
        units, start = [], 0
        for kind, frames, height, width in grids[first:first + count]:
            n = frames * height * width
            units.append(VisualUnit(kind, frames, height, width, start, torch.arange(n)))
            start += n
        kept = torch.rand(start, generator=generator) < 0.5
        if count == 3:
            kept[units[1].start: units[2].start] = False  # the middle unit loses every token
        origin = torch.cat([kept.nonzero().flatten(), torch.full((made,), EXTRA)])
        rows.append(units)
        origins.append(origin)
    for made in (False, True):
        got = units_now(rows, origins, made=True) if made else units_now(rows[:2], origins[:2])
        expected = [masked_units(u, o) for u, o in zip(rows, origins)][:len(got)]
        assert [[(u.kind, u.start, u.cells.tolist()) for u in row] for row in got] == \
               [[(u.kind, u.start, u.cells.tolist()) for u in row] for row in expected]
