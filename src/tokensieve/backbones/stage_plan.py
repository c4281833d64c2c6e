"""The stage plan every pruning session shares, whatever the backbone: which tokens a stage
may keep, in what order the stages see them, and how a selection is checked.

A session (LLaVA's, a CLIP ViT's) walks its stages with :func:`stage_inputs`, seeds each row
with :func:`row_generator`, checks what a method returns with :func:`check_selection`, and marks
the patch index it records for slots that are not image patches with :data:`PADDING` and
:data:`EXTRA`.
"""

from __future__ import annotations

import zlib

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Selection

# Patch index recorded in handle.last_kept for a slot that only pads a row keeping fewer tokens,
# and for a token a method made itself (Selection.extra).
PADDING = -2
EXTRA = -3


def row_generator(seed: int, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Generator]:
    """One generator per row, seeded by ``seed`` and the row's own content, so a sample draws
    the same whether it is alone or in a batch. tokens: ``(B, N, d)``; valid: optional ``(B, N)``,
    False for slots that only pad a row (left out of its seed)."""
    gens = []
    for r, row in enumerate(tokens.detach().float().cpu()):
        row = row if valid is None else row[valid[r].cpu()]
        digest = zlib.crc32(row[:, :4].mul(100).round().to(torch.int64).numpy().tobytes())
        gens.append(torch.Generator().manual_seed(seed * 1_000_003 + digest))
    return gens


def check_selection(sel: Selection, batch: int, n: int, keep: int, where: str, per_row: bool = False) -> None:
    """Budgets met exactly, or at most per row where ``per_row`` allows a count per row (``valid``,
    ``extra_valid``); indices sorted, unique and in range. Extra tokens count toward the budget."""
    idx, made = sel.indices, 0
    if sel.extra is not None:
        if sel.extra.dim() != 3 or sel.extra.shape[0] != batch:
            raise TokensieveError(f"{where}: extra tokens must be shaped (B, E, d) with B={batch}, "
                                  f"got {tuple(sel.extra.shape)}")
        made = sel.extra.shape[1]
        if sel.extra_valid is not None and (sel.extra_valid.shape != sel.extra.shape[:2]
                                            or sel.extra_valid.dtype != torch.bool):
            raise TokensieveError(f"{where}: extra_valid must be a bool tensor shaped like the extra tokens' "
                                  f"first two axes {tuple(sel.extra.shape[:2])}")
    counted = sel.valid is not None or sel.extra_valid is not None
    if counted and not per_row:
        raise TokensieveError(f"{where}: a count that varies per row is supported inside the LLM only (llm.k)")
    if not counted and idx.shape != (batch, keep - made):
        raise TokensieveError(f"{where}: a method returned indices of shape {tuple(idx.shape)}, "
                              f"expected {(batch, keep - made)}")
    if counted:
        if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] > n:
            raise TokensieveError(f"{where}: a method returned indices of shape {tuple(idx.shape)}, "
                                  f"expected ({batch}, at most {n})")
        if sel.valid is not None and (sel.valid.shape != idx.shape or sel.valid.dtype != torch.bool):
            raise TokensieveError(f"{where}: valid must be a bool tensor shaped like the indices {tuple(idx.shape)}")
        kept = sel.valid.sum(1) if sel.valid is not None else torch.full((batch,), idx.shape[1])
        total = kept + (sel.extra_valid.sum(1) if sel.extra_valid is not None else made)
        if not bool((total >= 1).all()):
            raise TokensieveError(f"{where}: every row must keep at least one token")
        if bool((total > keep).any()):
            raise TokensieveError(f"{where}: a row keeps {int(total.max())} tokens, more than the budget of {keep}")
    if sel.order is not None and (sel.order.shape != idx.shape or not torch.equal(
            sel.order.sort(1).values, torch.arange(idx.shape[1], device=idx.device).expand_as(idx))):
        raise TokensieveError(f"{where}: order must be a permutation of the {idx.shape[1]} kept slots in each row")
    if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise TokensieveError(f"{where}: kept indices must be sorted and unique")
    if bool((idx < 0).any()) or bool((idx >= n).any()):
        raise TokensieveError(f"{where}: kept indices out of range 0..{n - 1}")


def merges_in_blocks(method) -> bool:
    """True for a method the engine runs inside the tower's blocks (ToMe) instead of at its site."""
    return bool(getattr(method, "merges_in_blocks", False))


def tokens_entering_merges(method, n: int, keep: int, first: int, end: int) -> dict[int, int]:
    """``{block: patch tokens entering it}`` for blocks ``first + 1 .. end`` while an in-block method
    (ToMe) merges ``n`` tokens down to ``keep`` in blocks ``first .. end - 1``: each block runs on what
    the blocks before it left."""
    entering, left = {}, n
    for block, r in zip(range(first, end), method.merge_schedule(n, keep, end - first)):
        left -= r
        entering[block + 1] = left
    return entering


def stage_inputs(stages: dict, n_patches: int, keeps_cls: bool):
    """Yield ``(site, stage, n)`` in the order a forward pass reaches the sites, ``n`` the visual
    tokens the stage sees: the patches in the tower and before the LLM, plus CLS inside it when
    the LLM receives CLS. A stage keeping a count per row is followed as if it kept its budget.

    stages: ``{Site: Stage}``.
    """
    n, in_llm = n_patches, False
    for site in sorted(stages, key=lambda s: s.order):
        if not site.before_llm and not in_llm:
            n, in_llm = n + int(keeps_cls), True  # CLS is an ordinary image token in the LLM
        stage = stages[site]
        yield site, stage, n
        n = stage.method.kept_count(n, stage.budget.resolve(n, str(site)))
