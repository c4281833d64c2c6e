"""Qwen3-VL's DeepStack additions driven by the Qwen-VL session, so stages may act before them.

Qwen3-VL adds level ``j`` of its DeepStack features to the visual columns after decoder layer ``j``
(``j < n`` levels), with a mask over the sequence as the model built it: a stage at ``llm.k``,
``k < n``, shortens the sequence before that and the model's own addition would no longer fit.
When the session has stages inside the LLM, the adapter hands the model no DeepStack features
(``deepstack_features=[]``: the model then adds nothing) and forward hooks on layers ``0..n-1`` add
them instead, to each row's visual columns as they are then, each column its own token's feature:
the same elementwise sum as the model's ``_deepstack_process``, so keep-all stays bit-exact. Only
at prefill, as in the model. A mixin of :class:`~tokensieve.backbones.qwen_pruning.QwenPruningSession`:
it reads the session's ``bb``, ``handle``, ``llm_stages`` and, per pass, ``visual`` and ``entering``.
"""

from __future__ import annotations

import torch


def _decoded(kwargs: dict, layer: int, new: int) -> bool:
    """After decoder layer ``layer`` ran on ``new`` columns: were they new tokens after a cached prompt?
    (Its cache already holds them, so a prefill's cache is exactly ``new`` long.)"""
    cache = kwargs.get("past_key_values")
    return cache is not None and cache.get_seq_length(layer) > new


class QwenDeepStack:
    """DeepStack additions after layers ``0..n-1`` (mixin of the Qwen-VL session)."""

    @property
    def adds_deepstack(self) -> bool:
        """True when this session adds Qwen3-VL's DeepStack features itself (it has stages inside the LLM,
        in hard mode; soft mode keeps every column, so the model adds them as it does unpruned)."""
        return bool(self.bb.deepstack_levels and self.llm_stages and not self.soft)

    def _register_deepstack(self) -> None:
        self.deepstack: list[list[torch.Tensor]] | None = None
        if self.adds_deepstack:
            for j in range(self.bb.deepstack_levels):
                self.handle.hooks.append(
                    self.bb.llm_layers[j].register_forward_hook(self._add_deepstack(j), with_kwargs=True))

    def take_deepstack(self, features, units: list[list[int]]):
        """The tower output the model should receive: ``features`` (one ``(M_u, d)`` per visual unit, every
        DeepStack level cut alike) without its DeepStack levels when this session adds them, which it
        keeps per level and row: ``(n_b, d)``, the row's units in prompt order (units: per row its
        visual units, ``QwenLayout.units``)."""
        levels = getattr(features, "deepstack_features", None)
        self.deepstack = None
        if not self.adds_deepstack or not levels:
            return features
        self.deepstack = [[torch.cat([level[u] for u in row]) if row else level[0][:0] for row in units]
                          for level in levels]
        return type(features)(pooler_output=features.pooler_output, deepstack_features=[])

    def _add_deepstack(self, j: int):
        def hook(_layer, _args, kwargs, output):
            if not self.handle.active or self.deepstack is None or _decoded(kwargs, j, output.shape[1]):
                return None
            hidden = output.clone()  # (B, L, d)
            for row, (columns, entering) in enumerate(zip(self.visual, self.entering)):
                feature = self.deepstack[j][row].to(hidden.device, hidden.dtype)[entering.to(hidden.device)]
                hidden[row, columns] = hidden[row, columns] + feature
            return hidden
        return hook
