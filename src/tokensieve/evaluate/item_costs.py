"""The cost fields of an evaluation row (the fields of :mod:`.costs`) where each image gives its own
visual tokens (Qwen-VL's dynamic resolution, LLaVA-NeXT's and LLaVA-OneVision's anyres crops), so no
single prompt stands for the set: every figure is the mean over the scored items of that item's own
prefill, from its image, the tokens each stage kept for it (the sample log's ``kept``) and the median
text length. A family gives each item's FLOPs (:meth:`ItemCosts.item_flops`): :mod:`.qwen_costs`,
:mod:`.anyres_costs`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from tokensieve.attach import Handle
from tokensieve.backbones.base import Site
from tokensieve.evaluate.costs import FLOPS_STAGES
from tokensieve.evaluate.latency import kv_cache_bytes


def mean_number(values) -> int | float:
    """The mean of ``values``: an int when it is one, else to 2 decimals."""
    mean = statistics.mean(values)
    return int(mean) if float(mean).is_integer() else round(mean, 2)


class ItemCosts:
    """Cost fields of the rows of one evaluation: means over its items of each one's prefill.

    A family's ``__init__`` sets ``config`` (the model's), ``depth`` (LLM decoder layers), ``text_tokens``
    (the median prompt's non-image tokens), ``counts`` (each item's visual tokens a budget is counted in,
    unpruned) and ``visual_tokens`` (their mean, the unpruned row's); ``fixed`` (each item's visual tokens
    outside every budget that enter the LLM and stay there: anyres newlines) is 0 unless it says otherwise.
    """

    config = None
    depth: int
    text_tokens: int
    counts: list[int]
    visual_tokens: int | float

    def item_flops(self, i: int, llm_tokens: Sequence[int]) -> dict:
        """Item ``i``'s prefill FLOPs per stage (``vision``, ``projector``, ``llm``, ``lm_head``, ``total``),
        ``llm_tokens`` entering each decoder layer."""
        raise NotImplementedError

    def fixed(self, handle: Handle | None) -> list[int]:
        """Per item, the visual tokens outside every budget that enter the LLM with ``handle`` attached."""
        return [0] * len(self.counts)

    def of_run(self, handle: Handle | None = None, item_kept: list[dict[str, int]] | None = None) -> dict:
        """``flops`` per stage, ``tokens_per_llm_layer``, ``visual_tokens_mean_llm``, ``kv_cache_bytes``:
        means over the items, unpruned, or with ``handle``'s stages keeping for item ``i`` the visual
        tokens ``item_kept[i][str(stage)]`` (from its site on: ``projector`` or ``llm.0`` before the LLM,
        ``llm.k`` before decoder layer ``k``)."""
        # a stage before the LLM (projector, llm.0: the same tokens on Qwen-VL) cuts from layer 0
        cut = {} if handle is None else {Site("llm", 0) if Site.parse(st.site).before_llm else Site.parse(st.site):
                                         str(st) for st in handle.stages}
        layers = []
        for i, (visual, fixed) in enumerate(zip(self.counts, self.fixed(handle))):
            llm = []
            for k in range(self.depth):
                if Site("llm", k) in cut:
                    visual = item_kept[i][cut[Site("llm", k)]]
                llm.append(self.text_tokens + fixed + visual)
            layers.append(llm)
        return self._fields(layers)

    def of_llm_inputs(self, visual: list[int]) -> dict:
        """The fields of :meth:`of_run` where item ``i`` sends ``visual[i]`` visual tokens through every
        decoder layer (a choice made before the LLM, as the object oracle's)."""
        return self._fields([[self.text_tokens + v + f] * self.depth for v, f in zip(visual, self.fixed(None))])

    def _fields(self, layers: list[list[int]]) -> dict:
        """The cost fields from each item's positions entering each decoder layer (``layers[i][k]``)."""
        flops = [self.item_flops(i, llm) for i, llm in enumerate(layers)]
        cache = [kv_cache_bytes(self.config, llm) for llm in layers]
        per_layer = [mean_number(column) for column in zip(*layers)]
        return {"flops": {k: round(statistics.mean(f[k] for f in flops)) for k in FLOPS_STAGES},
                "tokens_per_llm_layer": per_layer,
                "visual_tokens_mean_llm": round(statistics.mean(per_layer) - self.text_tokens, 2),
                "kv_cache_bytes": round(statistics.mean(cache))}
