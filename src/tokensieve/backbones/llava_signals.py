"""The signals a LLaVA session captures for its stages' methods, and the table of which signal each
site offers (:func:`llava_signals_at`, docs/methods.md).

Signals are computed in forward hooks on a layer's own ``k_proj``, from the keys it has just made
(so nothing is recomputed and fused attention stays on), only for the signals a stage's method
asks for, and stored per site as ``"<site>:<name>"`` (``"<site>#<name>"`` for one kept apart from
the token signals). A mixin of :class:`~tokensieve.backbones.llava_pruning.LlavaPruningSession`:
it reads the session's ``handle``, ``bb``, ``stages``, ``plan``, ``vision_bias``, ``prompt``, ``question_span``
and ``image_count``.
"""

from __future__ import annotations

import torch

from tokensieve.backbones.attention_signals import layer_cls_attention
from tokensieve.backbones.base import Site
from tokensieve.backbones.llama_decoder import (
    is_decoding,
    last_queries_attention,
    last_query_attention,
    rotated_keys,
)
from tokensieve.method import ROW_SIGNALS


def llava_signals_at(backbone, site: Site) -> set[str]:
    """The signals a LLaVA adapter offers at ``site`` (docs/methods.md has the table)."""
    if site.stage == "vision":
        return {"cls_attention", "keys"} if site.layer >= 1 else set()
    if site.before_llm:
        tower = {"cls_attention", "keys", "last_block_cls_attention", "last_block_keys"}
        if site.stage == "projector":
            return tower | ({"cls_token"} if not backbone.keeps_cls else set())
        return tower | {"projector_input"}
    return {"text_attention", "prev_layer_keys", "normed_states", "positions", "layer_text_attention",
            "post_image_attention", "input_image_embeddings"}


class LlavaSignals:
    """Capture hooks and the signals they give a stage (mixin of the LLaVA session)."""

    def _register_captures(self) -> None:
        """The capture hooks the stages' methods need (an in-block stage reads its blocks' own keys)."""
        hooks, bb = self.handle.hooks, self.bb
        self._captured: dict[str, torch.Tensor] = {}
        self._attention_kwargs: dict | None = None
        for site, st in self.stages.items():
            needs = set(st.method.signals) | set(st.method.optional_signals)
            if site in self.plan.schedules:
                continue  # merging inside blocks reads each block's own keys (BlockMerger)
            if site.before_llm:
                source = site.layer - 1 if site.stage == "vision" else bb.feature_hidden_index - 1
                if {"cls_attention", "keys"} & needs:
                    attn = bb.vision_layers[source].self_attn
                    hooks.append(attn.k_proj.register_forward_hook(self._capture_vision(str(site), attn)))
                if site.stage != "vision" and {"last_block_cls_attention", "last_block_keys"} & needs:
                    attn = bb.vision_layers[-1].self_attn
                    hooks.append(attn.k_proj.register_forward_hook(self._capture_last_block(str(site), attn)))
                if site.stage == "projector" and "cls_token" in needs and not bb.keeps_cls:
                    hooks.append(bb.vision_layers[source].register_forward_hook(self._capture_cls_token(str(site))))
            if not site.before_llm and {"text_attention", "prev_layer_keys", "post_image_attention"} & needs:
                attn = bb.llm_layers[site.layer - 1].self_attn
                hooks.append(attn.register_forward_pre_hook(self._remember_attention_kwargs, with_kwargs=True))
                hooks.append(attn.k_proj.register_forward_hook(self._capture_llm(str(site), attn, needs)))
        if any("input_image_embeddings" in st.method.signals for st in self.stages.values()):
            self._entry = None  # the LLM's input, before any drop inside it
            hooks.append(bb.llm_layers[0].register_forward_pre_hook(self._capture_entry, with_kwargs=True))

    def _capture_vision(self, key: str, attn):
        def hook(_k_proj, args, keys):
            if not self.handle.active:
                return
            hidden = args[0]  # (B, T, d): the block's normalised input
            with self.handle.scoring():
                self._captured[key + ":cls_attention"] = layer_cls_attention(
                    hidden, attn.q_proj, keys, attn.num_heads, attn.scale, self._vision_key_bias())
                b, t, _ = keys.shape
                self._captured[key + ":keys"] = keys.view(b, t, attn.num_heads, -1).mean(2)
        return hook

    def _capture_entry(self, _layer, args, kwargs):
        """The LLM's input embeddings ``(B, L, d)`` of a prefill (what the image run and the text were
        before any drop inside the LLM)."""
        if self.handle.active and not is_decoding(kwargs, 0):
            self._entry = (args[0] if args else kwargs["hidden_states"], self.image_count)

    def _capture_last_block(self, key: str, attn):
        """PruMerge's signal: the last block's CLS attention as one head over the full width
        (softmax of ``q_cls . k / sqrt(d)``) and its full-width keys, without CLS."""
        def hook(_k_proj, args, keys):
            if not self.handle.active:
                return
            hidden = args[0]  # (B, T, d): the block's normalised input
            with self.handle.scoring():
                scale = hidden.shape[-1] ** -0.5
                self._captured[key + ":last_block_cls_attention"] = layer_cls_attention(
                    hidden, attn.q_proj, keys, 1, scale, self._vision_key_bias())
                self._captured[key + ":last_block_keys"] = keys
        return hook

    def _capture_cls_token(self, key: str):
        """The CLS state the feature layer outputs ``(B, d)``, which LLaVA's default strategy drops."""
        def hook(_layer, _args, output):
            if self.handle.active:
                hidden = output[0] if isinstance(output, tuple) else output
                self._captured[key + ":cls_token"] = hidden[:, 0]
        return hook

    def _vision_key_bias(self) -> torch.Tensor | None:
        return None if self.vision_bias is None else self.vision_bias[:, 0, 0]

    def _remember_attention_kwargs(self, attn, args, kwargs):
        """The rotary tables and mask the k_proj hook needs (None while decoding: no signal then)."""
        decoding = is_decoding(kwargs, attn.layer_idx)
        self._attention_kwargs = None if decoding or not self.handle.active else kwargs

    def _capture_llm(self, key: str, attn, needs: set):
        def hook(_k_proj, args, keys):
            if self._attention_kwargs is not None:
                with self.handle.scoring():
                    if "text_attention" in needs:
                        self._captured[key + ":text_attention"] = last_query_attention(
                            attn, args[0], keys, self._attention_kwargs)
                    if "prev_layer_keys" in needs:
                        self._captured[key + ":prev_layer_keys"] = rotated_keys(attn, keys, self._attention_kwargs)
                    if "post_image_attention" in needs and self.prompt is not None:
                        # every token after the image queries: (B, T, L), kept apart from token signals
                        self._captured[key + "#post_image_attention"] = last_queries_attention(
                            attn, args[0], keys, self._attention_kwargs, self.question_span()[0].shape[1])
        return hook

    def _signals(self, key: str, alive: torch.Tensor | None, offset: int) -> dict:
        """Captured signals over the candidate tokens: columns ``offset..``, then only the
        ``alive`` ``(B, n)`` ones among those, if given (signals of a whole row as they are)."""
        def pick(name):
            def get():
                full = self._captured[f"{key}:{name}"]
                if name in ROW_SIGNALS:
                    return full
                full = full[:, offset:]
                if alive is None:
                    return full
                index = alive if full.dim() == 2 else alive[..., None].expand(-1, -1, full.shape[-1])
                return full.gather(1, index)
            return get
        prefix = key + ":"
        return {name[len(prefix):]: pick(name[len(prefix):]) for name in self._captured if name.startswith(prefix)}

