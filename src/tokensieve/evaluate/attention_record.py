"""The CLS attention of every block of a ViT image tower and the patches each stage kept, per image
(``tokensieve clip-benchmark eval --extract_attention``)."""

from __future__ import annotations

from pathlib import Path

import torch

from tokensieve.attach import Handle
from tokensieve.backbones.attention_signals import cls_attention
from tokensieve.checkpoint import atomic_torch_save


class AttentionRecorder:
    """CLS attention of every block and the kept patch indices of every stage, per image.

    ``cls_attention[i]``: ``(images, T_i - 1)`` block ``i``'s head-averaged CLS attention over the
    patch tokens it runs on (in the order of ``kept`` of the last stage before it); ``kept[stage]``:
    ``(images, K)`` original patch indices kept there.
    """

    def __init__(self, backbone, handle: Handle | None):
        self.bb, self.handle = backbone, handle
        self.cls_attention: dict[int, list[torch.Tensor]] = {i: [] for i in range(backbone.depth)}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.hooks = [backbone.hook_attention_input(i, self._record(i)) for i in range(backbone.depth)]
        self.hooks.append(backbone.blocks[-1].register_forward_hook(self._record_kept))

    def _record(self, block: int):
        def fn(x: torch.Tensor) -> None:
            with torch.no_grad():
                row = cls_attention(self.bb.queries(block, x[:, :1]), self.bb.keys(block, x),
                                    self.bb.attention_scale(block), upcast=True)[:, 1:]
            self.cls_attention[block].append(row.half().cpu())
        return fn

    def _record_kept(self, *_):
        if self.handle is not None and self.handle.active:
            for name, kept in self.handle.last_kept.items():
                self.kept.setdefault(name, []).append(kept.cpu())

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def save(self, path: Path, meta: dict) -> None:
        atomic_torch_save({"cls_attention": {i: torch.cat(v) for i, v in self.cls_attention.items() if v},
                           "kept": {k: torch.cat(v) for k, v in self.kept.items()}, **meta}, path)
