"""The cost fields of an evaluation row on a Qwen-VL model (the fields of :mod:`.costs`).

Images give different visual-token counts (dynamic resolution: an image of patch grid
``t x h x w`` gives ``t*h*w / 4`` tokens), so no single prompt stands for the set: every figure
is the mean over the scored items of that item's own prefill, from its image's grid, the tokens
each stage kept for it (the sample log's ``kept``) and the median text length. FLOPs are
:func:`~tokensieve.evaluate.qwen_flops.qwen_prefill_flops`.
"""

from __future__ import annotations

import statistics

from tokensieve.attach import Handle
from tokensieve.backbones.base import Site
from tokensieve.data.vqa_files import VQAItem
from tokensieve.evaluate.costs import FLOPS_STAGES, median_text_tokens
from tokensieve.evaluate.latency import kv_cache_bytes
from tokensieve.evaluate.qwen_flops import qwen_prefill_flops


def image_grids(backbone, items: list[VQAItem]) -> list[tuple[int, int, int]]:
    """Each item's image patch grid ``(t, h, w)`` as the backbone's processor resizes it."""
    processor = backbone.processor.image_processor
    return [tuple(processor(images=[item.image], return_tensors="pt")["image_grid_thw"][0].tolist())
            for item in items]


def mean_number(values) -> int | float:
    """The mean of ``values``: an int when it is one, else to 2 decimals."""
    mean = statistics.mean(values)
    return int(mean) if float(mean).is_integer() else round(mean, 2)


class QwenCosts:
    """Cost fields of the rows of one evaluation on a Qwen-VL model: means over ``items``."""

    def __init__(self, backbone, items: list[VQAItem]):
        self.config = backbone.config
        self.depth = len(backbone.llm_layers)
        self.text_tokens = median_text_tokens(backbone, items)
        self.grids = image_grids(backbone, items)
        merge = backbone.merge_unit
        self.counts = [t * h * w // merge for t, h, w in self.grids]  # each item's visual tokens, unpruned
        self.visual_tokens = mean_number(self.counts)

    def of_run(self, handle: Handle | None = None, item_kept: list[dict[str, int]] | None = None) -> dict:
        """``flops`` per stage, ``tokens_per_llm_layer``, ``visual_tokens_mean_llm``, ``kv_cache_bytes``:
        means over the items, unpruned, or with ``handle``'s stages keeping for item ``i`` the visual
        tokens ``item_kept[i][str(stage)]`` (from its site on: ``projector`` or ``llm.0`` before the LLM,
        ``llm.k`` before decoder layer ``k``)."""
        # projector and llm.0 are the same tokens on Qwen-VL (the patch merger's output): both cut from layer 0
        cut = {} if handle is None else {Site("llm", 0) if Site.parse(st.site).before_llm else Site.parse(st.site):
                                         str(st) for st in handle.stages}
        layers = []
        for i, visual in enumerate(self.counts):
            llm = []
            for k in range(self.depth):
                if Site("llm", k) in cut:
                    visual = item_kept[i][cut[Site("llm", k)]]
                llm.append(self.text_tokens + visual)
            layers.append(llm)
        return self._fields(layers)

    def of_llm_inputs(self, visual: list[int]) -> dict:
        """The fields of :meth:`of_run` where item ``i`` sends ``visual[i]`` visual tokens through every
        decoder layer (a choice made before the LLM, as the object oracle's)."""
        return self._fields([[self.text_tokens + v] * self.depth for v in visual])

    def _fields(self, layers: list[list[int]]) -> dict:
        """The cost fields from each item's positions entering each decoder layer (``layers[i][k]``)."""
        flops = [qwen_prefill_flops(self.config, grid, llm) for grid, llm in zip(self.grids, layers)]
        cache = [kv_cache_bytes(self.config, llm) for llm in layers]
        per_layer = [mean_number(column) for column in zip(*layers)]
        return {"flops": {k: round(statistics.mean(f[k] for f in flops)) for k in FLOPS_STAGES},
                "tokens_per_llm_layer": per_layer,
                "visual_tokens_mean_llm": round(statistics.mean(per_layer) - self.text_tokens, 2),
                "kv_cache_bytes": round(statistics.mean(cache))}
