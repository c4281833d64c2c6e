"""``soft`` mode on Qwen-VL: every visual token stays in the sequence, the dropped ones are masked as
attention keys.

A stage keeps its choice (per image at ``llm.0``, per row at ``llm.k``) but removes nothing: from its
layer on (decoder layer 0 for ``llm.0``) each dropped column gets the most negative additive bias on
its key column in every later layer, and a kept one ``0``, or ``log`` of the method's ``key_mask``
weight (:func:`~tokensieve.backbones.llama_decoder.soft_key_bias`), through which a trained method
learns. Positions, the M-RoPE ids, ``rope_deltas`` and Qwen3-VL's DeepStack additions stay what the
plain model makes (the model adds DeepStack itself: every column is still there). A later stage
chooses among the tokens still alive, so chained stages combine as in hard mode, and with a binary
mask the kept columns' outputs equal hard removal's. The stages inside the LLM mask in
:meth:`.row_llm.RowLLMStages._mask_dropped`; this mixin adds ``llm.0``. A mixin of
:class:`~tokensieve.backbones.qwen_pruning.QwenPruningSession`: it reads the session's ``handle`` and,
per pass, writes ``visual`` (the alive visual columns of each row), ``origin`` and ``biases``.
"""

from __future__ import annotations

import torch

from tokensieve.backbones.llama_decoder import most_negative, soft_key_bias
from tokensieve.backbones.row_llm import masks_nothing


class QwenSoftMasks:
    """Soft mode's key biases (mixin of the Qwen-VL session)."""

    def soft_features(self, features, kept: list[torch.Tensor], values: list[torch.Tensor | None]):
        """``llm.0`` in soft mode: the tower output with every token, the kept ones' contents replaced by
        ``values`` where a method gives them (one ``(K_i, d)`` or None per image; DeepStack levels as
        they are). ``kept``: per image its ``(K_i,)`` kept indices, masked from decoder layer 0 on
        when the LLM pass begins (:meth:`_begin_soft`)."""
        pooled = features.pooler_output
        masks_some = not masks_nothing(kept, self.llm0_key_masks, [len(f) for f in pooled])
        self._soft_kept = kept if masks_some else None
        if all(v is None for v in values):
            return features
        fields = {"pooler_output": tuple(f if v is None else f.index_copy(0, k.to(f.device), v.to(f.dtype))
                                         for f, k, v in zip(pooled, kept, values))}
        deepstack = getattr(features, "deepstack_features", None)
        if deepstack is not None:
            fields["deepstack_features"] = deepstack
        return type(features)(**fields)

    def _begin_soft(self, dtype: torch.dtype) -> None:
        """At the start of an LLM pass: the ``llm.0`` stage's choice (per unit, in prompt order over the
        batch), if it masks any token, as a key bias from layer 0 on; the alive columns cut to its kept tokens."""
        kept, self._soft_kept = self._soft_kept, None
        if kept is None:
            return
        masks, unit = self.llm0_key_masks, 0
        bias = torch.zeros(len(self.visual), self.length, dtype=dtype, device=self.visual[0].device)
        for row, units in enumerate(self.units):
            chosen, weights = [], []
            for at in units:  # the row's images and videos, in prompt order
                k = kept[unit].to(bias.device)
                chosen.append(at.start + k)
                weights.append(torch.ones(len(k), device=bias.device) if masks[unit] is None
                               else masks[unit].to(bias.device))
                unit += 1
            if chosen:
                columns, alive = self.visual[row], torch.cat(chosen)
                bias[row, columns] = most_negative(dtype)
                bias[row, columns[alive]] = soft_key_bias(torch.cat(weights), dtype)
                self.visual[row], self.origin[row] = columns[alive], self.origin[row][alive]
        self.biases.append((0, bias))
