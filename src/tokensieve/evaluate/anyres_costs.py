"""The cost fields of an evaluation row on a LLaVA-NeXT or LLaVA-OneVision model (the fields of
:mod:`.costs`): means over the items of each one's prefill (:class:`~tokensieve.evaluate.item_costs.ItemCosts`).

Each image gives its own packed run (:mod:`tokensieve.backbones.anyres_layout`): the base grid, the
unpadded (on OneVision, possibly resampled) canvas of its crops, one newline after every canvas row. A
budget counts the base and crop tokens (``visual_tokens_kept``, ``counts``); the newlines are outside it
and enter the LLM (``tokens_per_llm_layer``, ``visual_tokens_mean_llm``), none where the ``llm.0``
method drops them. FLOPs are :func:`~tokensieve.evaluate.anyres_flops.anyres_prefill_flops`: the tower
on every crop of the item's image.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokensieve.attach import Handle
from tokensieve.backbones.anyres_pruning import LLM0
from tokensieve.backbones.base import Site
from tokensieve.data.vqa_files import VQAItem
from tokensieve.evaluate.anyres_flops import anyres_prefill_flops
from tokensieve.evaluate.costs import median_text_tokens
from tokensieve.evaluate.item_costs import ItemCosts, mean_number


def image_sizes(backbone, items: list[VQAItem]) -> list[tuple[int, int]]:
    """Each item's image size ``(height, width)`` as the backbone's processor reports it (``image_sizes``)."""
    processor = backbone.processor.image_processor
    return [tuple(processor(images=[item.image], return_tensors="pt")["image_sizes"][0].tolist()) for item in items]


class AnyresCosts(ItemCosts):
    """Cost fields of the rows of one evaluation on a LLaVA-NeXT or LLaVA-OneVision model: means over ``items``."""

    def __init__(self, backbone, items: list[VQAItem]):
        self.config = backbone.config
        self.depth = len(backbone.llm_layers)
        self.cls = backbone.tower_has_cls
        self.text_tokens = median_text_tokens(backbone, items)
        layouts = [backbone.image_layout(size) for size in image_sizes(backbone, items)]
        self.n_crops = [layout.n_crops for layout in layouts]
        self.newlines = [int(layout.is_newline.sum()) for layout in layouts]
        self.counts = [len(layout) - n for layout, n in zip(layouts, self.newlines)]  # base and crop tokens
        self.visual_tokens = mean_number(self.counts)

    def fixed(self, handle: Handle | None) -> list[int]:
        """Each item's newlines; none where the ``llm.0`` stage's method drops them (``newlines = "drop"``)."""
        first = None if handle is None else next((st for st in handle.stages if Site.parse(st.site) == LLM0), None)
        drop = first is not None and getattr(first.method, "newlines", "keep") == "drop"
        return [0] * len(self.newlines) if drop else self.newlines

    def item_flops(self, i: int, llm_tokens: Sequence[int]) -> dict:
        return anyres_prefill_flops(self.config, self.n_crops[i], llm_tokens, self.cls)
