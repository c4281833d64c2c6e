"""The LLM input of a LLaVA-style model, assembled from kept visual tokens: each row's one ``<image>``
placeholder run shrunk to the tokens it keeps, the features scattered into it, rows re-padded on the left.

Family-neutral for models with 1-D RoPE that take ``inputs_embeds`` (LLaVA-1.5, LLaVA-NeXT): the
adapters find the runs, this builds what the LLM receives (:func:`assemble_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tokensieve.errors import TokensieveError
from tokensieve.ops import trues_first


@dataclass
class AssembledInputs:
    """What the LLM receives. All ``(B, L')``, except ``inputs_embeds`` ``(B, L', d)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    inputs_embeds: torch.Tensor

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def left_padded(attention_mask: torch.Tensor, *columns: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``attention_mask`` ``(B, L)`` and each of ``columns`` (``(B, L)`` per-column values, e.g. the ids; None
    stays None) with every row's padding moved before its real columns, in order: the identity on a
    left-padded batch. A stable sort of the mask, so nothing is read back from the device."""
    order = trues_first(~attention_mask.bool())  # (B, L) padding first
    return [None if c is None else c.gather(1, order) for c in (attention_mask, *columns)]


@dataclass(frozen=True)
class RowImage:
    """Where a row's one image run lies, known on the host: ``before`` real (not padding) columns precede it,
    it holds ``count`` placeholders, and the row has ``padding`` columns of padding."""

    before: int
    count: int
    padding: int


def assemble_rows(embedding: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: list[RowImage],
                  image_embeds: torch.Tensor | Sequence[torch.Tensor], image_token_id: int, pad_token_id: int | None,
                  image_alive: torch.Tensor | None = None) -> AssembledInputs:
    """Put the visual tokens of each row into its placeholder run, shrinking the run to fit.

    embedding: the LLM's input embeddings. input_ids, attention_mask: ``(B, L)`` prompts with full
    placeholder runs, padded on either side. images: per row where its run lies (from its layout, so that
    nothing is read back from the device here).
    image_embeds: ``(B, M, d)`` or one ``(M_b, d)`` per row (rows may keep different counts).
    image_alive: optional ``(B, M)``, or the rows' ``(M_b,)`` one after the other (soft mode): False for
    visual tokens that stay in the run with attention mask 0 (their positions skipped).
    Positions follow the attention mask (``cumsum - 1``), as ``generate()`` computes them, so a row
    gives the same result alone or in a padded batch.
    """
    # Each row's real columns first, in order (a stable sort; a boolean mask would wait for the device).
    real_first = trues_first(attention_mask.bool())
    rows = []
    for b, image in enumerate(images):
        row = input_ids[b].index_select(0, real_first[b, :input_ids.shape[1] - image.padding])
        start, count, kept = image.before, image.count, image_embeds[b].shape[0]
        if kept > count:
            raise TokensieveError(f"row {b}: {kept} visual tokens for {count} <image> placeholders")
        run = row.new_full((kept,), image_token_id)
        rows.append(torch.cat([row[:start], run, row[start + count:]]))
    length = max(len(r) for r in rows)
    pad = 0 if pad_token_id is None else pad_token_id
    ids = torch.stack([torch.cat([r.new_full((length - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(length - len(r), dtype=attention_mask.dtype, device=r.device),
                                   torch.ones(len(r), dtype=attention_mask.dtype, device=r.device)]) for r in rows])
    embeds = embedding(ids)
    features = torch.cat(list(image_embeds)).to(embeds.device, embeds.dtype)
    is_image = ids == image_token_id
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1).expand_as(embeds), features)
    if image_alive is not None:
        mask = mask.masked_scatter(is_image, image_alive.to(mask.dtype).flatten())
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return AssembledInputs(ids, mask, position_ids, embeds)
