"""The Qwen-VL towers' attention signals per visual token, and the refusal of CLS-attention methods.

The Qwen towers have no CLS token, so ``cls_attention`` does not exist there. What they give
instead, read from the tower's LAST block as the authors' VisionZip Qwen2.5-VL port reads it
(JIA-Lab-research/VisionZip ``Qwen2_5_VL/qwen2_5vl_visionzip.py``, commit 68993a31):

* ``received_attention`` ``(N_i,)`` per image: the attention each visual token receives - the
  block's softmax attention within its own span (``cu_seqlens``: the image, or a window), mean
  over heads, summed over the span's queries, averaged over the ``merge_unit`` patches behind
  the token;
* ``keys`` ``(N_i, d_head)``: the block's rotated keys, averaged over those patches and over heads.

Rows come in the order of the merger's output (Qwen2.5's window order undone). The block's own
``qkv`` output is reused (a hook on it), so its fused attention stays on; the attention rows are
recomputed in float32, a slab of queries at a time (at most ``SLAB_ELEMENTS`` entries over the heads).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from tokensieve.backbones.qwen_units import in_unit_order
from tokensieve.errors import TokensieveError

TOWER_SIGNALS = ("received_attention", "keys")
CLS_SIGNALS = ("cls_attention", "last_block_cls_attention")
SLAB_ELEMENTS = 1 << 26  # attention entries recomputed at once (256 MB in float32), whatever the span


def received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """``(S,)``: per key, the attention it receives, summed over the queries of its span, mean over heads.

    q, k: ``(S, H, d_h)`` rotated queries and keys of the packed sequence; cu_seqlens: ``(n + 1,)``
    span boundaries (attention stays within a span); scale: the block's logit scale.
    """
    out = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks = q[a:b].transpose(0, 1).float(), k[a:b].transpose(0, 1).float()  # (H, T, d_h)
        total = qs.new_zeros(b - a)
        slab = max(1, SLAB_ELEMENTS // (qs.shape[0] * (b - a)))
        for start in range(0, b - a, slab):
            rows = (qs[:, start:start + slab] @ ks.transpose(1, 2)) * scale  # (H, slab, T)
            total += rows.softmax(-1).mean(0).sum(0)
        out.append(total)
    return torch.cat(out)


def per_token(x: torch.Tensor, unit: int, order: torch.Tensor | None) -> torch.Tensor:
    """``(S, ...)`` per patch -> ``(S / unit, ...)``: the mean over each token's ``unit`` consecutive
    patches (the merger's groups), rows then taken in ``order`` if given."""
    tokens = x.reshape(x.shape[0] // unit, unit, *x.shape[1:]).mean(1)
    return tokens if order is None else tokens[order.to(tokens.device)]


class TowerCapture:
    """Hooks on the last vision block's attention of a Qwen-VL adapter, and the signals they give.

    backbone: the :class:`~tokensieve.backbones.hf_qwen.QwenVLBackbone`; active: whether the
    handle is active now (nothing is kept otherwise).
    """

    def __init__(self, backbone, active: Callable[[], bool]):
        self.bb, self.active = backbone, active
        self.attn = backbone.visual.blocks[-1].attn
        self._kwargs: dict | None = None  # the block's cu_seqlens and position_embeddings in this tower pass
        self._passes: list[tuple[torch.Tensor, dict]] = []  # per tower pass: its qkv output (S, 3 * d_v), kwargs

    def install(self, hooks: list) -> None:
        hooks.append(self.attn.register_forward_pre_hook(self._remember, with_kwargs=True))
        hooks.append(self.attn.qkv.register_forward_hook(self._capture))

    def _remember(self, _attn, _args, kwargs):
        if self.active():
            self._kwargs = kwargs

    def _capture(self, _qkv, _args, output):
        if self.active():
            self._passes.append((output, self._kwargs))

    def signals(self, tower_grids: list[torch.Tensor], kinds: list[str]
                ) -> Callable[[], dict[str, list[torch.Tensor]]]:
        """A function giving ``{name: per unit tensor}`` for :data:`TOWER_SIGNALS` (``(N_u,)`` and
        ``(N_u, d_h)``, units in prompt order) from this pass's tower passes (images, then videos; their
        ``(n, 3)`` grids ``tower_grids``; kinds: per unit ``"image"`` or ``"video"``), computed once, when
        first asked."""
        passes, self._passes = self._passes[len(self._passes) - len(tower_grids):], []
        cache: list[dict] = []

        def get() -> dict[str, list[torch.Tensor]]:
            if not cache:
                per_kind = {kind: self._compute(qkv, kwargs, grid) for kind, (qkv, kwargs), grid
                            in zip([k for k in ("image", "video") if k in kinds], passes, tower_grids)}
                cache.append({name: in_unit_order({kind: got[name] for kind, got in per_kind.items()}, kinds)
                              for name in TOWER_SIGNALS})
            return cache[0]
        return get

    def _compute(self, qkv: torch.Tensor, kwargs: dict, grid_thw: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """One tower pass's signals per visual unit of its ``(n, 3)`` grids."""
        attn, s = self.attn, qkv.shape[0]
        q, k, _ = qkv.reshape(s, 3, attn.num_heads, -1).unbind(1)  # (S, H, d_h) each
        cos, sin = kwargs["position_embeddings"]
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # the family's own RoPE
        q, k = rotate(q, k, cos, sin)
        received = received_attention(q, k, kwargs["cu_seqlens"], attn.scaling)
        unit, order = self.bb.merge_unit, self.bb.merger_output_order(grid_thw)
        counts = self.bb.image_token_counts(grid_thw)
        return {"received_attention": list(per_token(received, unit, order).split(counts)),
                "keys": list(per_token(k.float().mean(1), unit, order).to(k.dtype).split(counts))}


def refuse_without_cls(st) -> None:
    """Refuse, in one line, a stage whose method reads CLS attention: the Qwen towers have no CLS
    token. Names the method's variant without CLS where it has one (``no_cls_options``, and whose it
    is: ``no_cls_source``, "ours" unless said)."""
    method = st.method
    missing = [s for s in CLS_SIGNALS if s in method.signals]
    if missing:
        raise TokensieveError(f"{st}: {method.name} needs {missing[0]}, which the Qwen-VL towers do not have "
                              f"(no CLS token){without_cls_hint(method)}")


def without_cls_hint(method) -> str:
    """``"; use name(option=value, ...) ..."`` naming the method's variant without CLS, or ``""``."""
    options = getattr(method, "no_cls_options", None)
    if not options:
        return "; it has no variant without CLS"
    given = ", ".join(f"{k}={v!r}" for k, v in options.items())
    whose = getattr(method, "no_cls_source", "ours")
    return (f"; use {method.name}({given}) ({whose}: it ranks by the attention each token receives in the "
            "tower's last block; docs/methods.md)")
