"""How the ``llm.0`` budget of a LLaVA-NeXT image is split over its parts, the base image and each crop:
the session option ``split`` (``tokensieve.attach(..., split=...)``).

* ``all`` (default): one budget ``K`` over all the image's base and crop tokens, chosen at once.
* ``even``: ``floor(K / n)`` per part (``n``: the base and its crops), the remainder to the base. A part
  with fewer tokens than its share (the base under a large budget, a crop cut by the letterbox) keeps
  them all and hands the rest on to the next part with room (the base, then the crops in order), so
  the image keeps exactly ``K`` (ours).
* ``hired``: HiRED's rule (:func:`tokensieve.methods.hired.hired_part_budgets` at HiRED's default
  ``alpha``), from the base image's CLS attention in the tower's first block. A share larger than its
  part's tokens keeps them all and the rest is lost, as HiRED loses what it picks in a crop's letterbox,
  so the image keeps at most ``K``.

Under ``even`` and ``hired`` the stage's method is called once per part, on that part's tokens with its
budget, and chooses among them with its own scores; the parts' choices together are the image's.
Both need one token per part: a budget smaller than an image's parts is refused in one line.
"""

from __future__ import annotations

import torch

from tokensieve.errors import TokensieveError
from tokensieve.methods.hired import HiRED, hired_part_budgets

SPLITS = ("all", "even", "hired")
# The per-crop signal each split rule reads, captured for it whatever the stage's method reads.
SPLIT_SIGNALS = {"all": set(), "even": set(), "hired": {"first_block_crop_cls_attention"}}


def check_split(split: str, stages: dict) -> None:
    """Refuse, at attach, a split with no ``llm.0`` stage to split, or with HiRED there (its own rule).
    stages: ``{Site: Stage}`` of the handle."""
    if split == "all":
        return
    at_llm0 = [st for site, st in stages.items() if site.stage == "llm" and site.layer == 0]
    if not at_llm0:
        raise TokensieveError(f"split {split!r} divides the llm.0 stage's budget over each image's base and crops; "
                              "no stage acts at llm.0: give split 'all'")
    if isinstance(at_llm0[0].method, HiRED):
        raise TokensieveError(f"{at_llm0[0]}: hired splits its budget by its own rule; give it split 'all' "
                              "(split 'hired' gives that rule to another method)")


def part_budgets(split: str, keep: int, sizes: list[int], first_block_base: torch.Tensor | None) -> list[int]:
    """Per part of one image (the base, then each crop) the tokens it keeps under ``split`` (not ``all``).

    keep: the image's budget; sizes: per part its candidate tokens (newlines left out);
    first_block_base: ``(P,)`` the base image's CLS attention in the tower's first block (``hired``).
    """
    n = len(sizes)
    if keep < n:
        raise TokensieveError(f"budget {keep} < {n} parts (base + {n - 1} crops): split {split!r} needs one token "
                              "per part; give a larger budget or split 'all'")
    if split == "hired":
        return [min(share, size) for share, size in zip(hired_part_budgets(keep, n, first_block_base, HiRED.alpha),
                                                        sizes)]
    share = keep // n
    wanted = [keep - (n - 1) * share] + [share] * (n - 1)
    budgets = [min(w, size) for w, size in zip(wanted, sizes)]
    left = keep - sum(budgets)
    for part, size in enumerate(sizes):  # what a full part could not hold, to the next parts with room
        extra = min(left, size - budgets[part])
        budgets[part] += extra
        left -= extra
    return budgets
