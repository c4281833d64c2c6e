"""The cost fields of an evaluation row on a Qwen-VL model (the fields of :mod:`.costs`): means over
the items of each one's prefill (:class:`~tokensieve.evaluate.item_costs.ItemCosts`).

An image of patch grid ``t x h x w`` (dynamic resolution) gives ``t*h*w / 4`` tokens. FLOPs are
:func:`~tokensieve.evaluate.qwen_flops.qwen_prefill_flops`.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokensieve.data.vqa_files import VQAItem
from tokensieve.evaluate.costs import median_text_tokens
from tokensieve.evaluate.item_costs import ItemCosts, mean_number
from tokensieve.evaluate.qwen_flops import qwen_prefill_flops


def image_grids(backbone, items: list[VQAItem]) -> list[tuple[int, int, int]]:
    """Each item's image patch grid ``(t, h, w)`` as the backbone's processor resizes it."""
    processor = backbone.processor.image_processor
    return [tuple(processor(images=[item.image], return_tensors="pt")["image_grid_thw"][0].tolist())
            for item in items]


class QwenCosts(ItemCosts):
    """Cost fields of the rows of one evaluation on a Qwen-VL model: means over ``items``."""

    def __init__(self, backbone, items: list[VQAItem]):
        self.config = backbone.config
        self.depth = len(backbone.llm_layers)
        self.text_tokens = median_text_tokens(backbone, items)
        self.grids = image_grids(backbone, items)
        merge = backbone.merge_unit
        self.counts = [t * h * w // merge for t, h, w in self.grids]  # each item's visual tokens, unpruned
        self.visual_tokens = mean_number(self.counts)

    def item_flops(self, i: int, llm_tokens: Sequence[int]) -> dict:
        return qwen_prefill_flops(self.config, self.grids[i], llm_tokens)
