"""HiRED: split an anyres image's budget between its base image and its crops, then keep each part's
tokens by the vision tower's CLS attention (LLaVA-NeXT, at ``llm.0``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register

NEWLINE_POLICIES = ("drop", "keep")


def hired_part_budgets(keep: int, n_parts: int, first_block_base: torch.Tensor, alpha: float) -> list[int]:
    """How many of its ``P`` patches each part of an image keeps: the base image first, then each crop.

    keep: the image's budget; n_parts: base + crops; first_block_base: ``(P,)`` the base image's CLS
    attention in the tower's first block; alpha: the base image's share of the budget.

    The base keeps ``min(int(keep * alpha), P)``; the crops share the rest (at most ``P`` each) in
    proportion to how many of the base's ``int(P * (1 - alpha))`` most attended patches fall in each of
    ``n_parts - 1`` equal runs of the base's raster order (horizontal bands, crop ``i`` taking band
    ``i``), each share rounded down, so the parts may keep fewer than ``keep`` in all.
    """
    per_part = first_block_base.shape[0]
    base = min(int(keep * alpha), per_part)
    rest = min(keep - base, (n_parts - 1) * per_part)
    if rest <= 0:
        return [base] + [0] * (n_parts - 1)
    weighing = int(per_part * (1 - alpha))
    if per_part % (n_parts - 1) or not weighing:
        raise TokensieveError(f"hired: the base image's {per_part} patches do not split into {n_parts - 1} equal "
                              f"bands, one per crop, with some of its int({per_part} * (1 - alpha {alpha})) most "
                              "attended patches to weigh them by")
    salient = torch.zeros(per_part, dtype=torch.bool, device=first_block_base.device)
    salient[first_block_base.topk(weighing).indices] = True
    in_band = salient.view(n_parts - 1, -1).sum(-1)  # int64 counts; the share below is float32, as the reference's
    shares = ((in_band / in_band.sum()) * rest).int().clamp(max=per_part)
    return [base] + shares.tolist()


def hired_masks(crop_attention: torch.Tensor, first_block_base: torch.Tensor, keep: int, alpha: float) -> torch.Tensor:
    """``(n_parts, P)`` bool: the patches each part of one image keeps.

    crop_attention: ``(n_parts, P)`` each part's CLS attention at the feature block (base first, then the
    crops in the tower's order); first_block_base: ``(P,)``; keep, alpha: as :func:`hired_part_budgets`.
    Each part keeps its own budget's most attended patches (``torch.topk``, ties as it breaks them).
    """
    budgets = hired_part_budgets(keep, crop_attention.shape[0], first_block_base, alpha)
    mask = torch.zeros_like(crop_attention, dtype=torch.bool)
    for part, budget in enumerate(budgets):
        mask[part, crop_attention[part].topk(budget).indices] = True
    return mask


@register
@dataclass
class HiRED(Method):
    """HiRED: a high-resolution (anyres) image's budget split between its base image and its crops by
    the base's CLS attention, each part then keeping its most CLS-attended patches.

    Acts at ``llm.0`` on LLaVA-NeXT (the only site offering its signals), per image, on the packed run (base grid, then the unpadded canvas
    of the crops). Signals: ``crop_cls_attention`` ``(1, n_parts, P)`` (the CLS row of the feature
    block's attention per crop, softmax per head over CLS and the ``P`` patches, mean over heads, CLS
    column dropped), ``first_block_crop_cls_attention`` (the same from the tower's first block) and
    ``anyres_source`` ``(1, N)`` (each token's crop patch ``c * P + p``). Budgets per part:
    :func:`hired_part_budgets`; a patch chosen in a crop's letterbox padding (cut by the packing) is
    lost, as in the reference, so an image keeps at most its budget (``Selection.valid``). Newlines:
    ``newlines="drop"`` (the reference passes no ``image_newline``); ``"keep"`` is ours.

    Reproduces hasanar1f/HiRED ``HiRED_token_selection`` (tests/test_parity_hired.py); docs/methods.md
    lists what differs.
    """

    name = "hired"
    paper = ("Arif, Yoon, Nikolopoulos, Vandierendonck, John, Ji. HiRED: Attention-Guided Token Dropping for "
             "Efficient Inference of High-Resolution Vision-Language Models. arXiv:2408.10945 (2024)")
    stages = ("llm",)
    default_site = "llm.0"
    signals = ("crop_cls_attention", "first_block_crop_cls_attention", "anyres_source")

    alpha: float = 0.5
    newlines: str = "drop"

    def __post_init__(self):
        if not 0 <= self.alpha < 1:
            raise TokensieveError(f"hired: alpha {self.alpha} is not in [0, 1) (the base image's share of the "
                                  "budget; at 1 the reference divides by zero)")
        if self.newlines not in NEWLINE_POLICIES:
            raise TokensieveError(f"hired: newlines {self.newlines!r} is not one of {', '.join(NEWLINE_POLICIES)}")

    def select(self, inputs: SiteInputs) -> Selection:
        crops, first, source = (inputs.signal(name) for name in self.signals)
        n_parts = crops.shape[1]
        if inputs.keep < n_parts:
            raise TokensieveError(f"hired at {inputs.site}: a budget of {inputs.keep} tokens is smaller than the "
                                  f"image's {n_parts} parts (its base and {n_parts - 1} crops); HiRED splits the "
                                  f"budget over them: give at least {n_parts}")
        kept = []  # per row (N,) bool over its tokens
        for b in range(inputs.tokens.shape[0]):
            mask = hired_masks(crops[b], first[b, 0], inputs.keep, self.alpha)
            kept.append(mask.flatten()[source[b].to(mask.device)])
        return padded_selection(torch.stack(kept).to(inputs.tokens.device))


def padded_selection(kept: torch.Tensor) -> Selection:
    """A selection of the ``(B, N)`` bool ``kept`` tokens, rows keeping fewer than the most any keeps padded
    with tokens they drop, marked invalid (``Selection.valid``)."""
    width = int(kept.sum(1).max())
    # kept tokens first, then dropped ones, each in token order; the first ``width`` sorted back
    rank = (~kept).long() * kept.shape[1] + torch.arange(kept.shape[1], device=kept.device)
    indices = rank.topk(width, dim=1, largest=False).indices.sort(1).values
    return Selection(indices, valid=kept.gather(1, indices))
