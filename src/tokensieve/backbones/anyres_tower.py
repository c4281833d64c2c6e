"""The LLaVA-NeXT tower's CLS attention per crop, for methods that choose per crop (HiRED).

The tower runs once over every crop of the batch (its batch axis is crops: each image's base crop,
then its high-resolution crops, images in order). A hook on a block's own ``k_proj`` recomputes the
CLS row of that block's attention from the keys it has just made (so the fused attention stays on):
softmax per head over CLS and the ``P`` patches, mean over heads, CLS column dropped, ``(crops, P)``.
Rows are regrouped per image here; a session gathers them to an image's packed run through
:attr:`AnyresLayout.source` (a newline has no crop patch, so no row).

Signals (``(1, n_crops, P)`` per image, base first):

* ``crop_cls_attention``: the feature block's (the block whose output is ``vision_feature_layer``);
* ``first_block_crop_cls_attention``: the tower's first block's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokensieve.backbones.attention_signals import layer_cls_attention

CROP_SIGNALS = ("crop_cls_attention", "first_block_crop_cls_attention")


class CropAttention:
    """Hooks on the tower blocks that give :data:`CROP_SIGNALS`, and their rows in the last tower pass.

    backbone: the :class:`~tokensieve.backbones.hf_llava_next.LlavaNextBackbone`; names: the signals a
    stage reads; active: whether the handle is active now (nothing is captured otherwise); scoring: a
    context manager charging the time to choosing tokens (``handle.scoring``).
    """

    def __init__(self, backbone, names: set[str], active: Callable[[], bool], scoring: Callable):
        blocks = {"crop_cls_attention": backbone.feature_block, "first_block_crop_cls_attention": 0}
        self.blocks = {name: blocks[name] for name in CROP_SIGNALS if name in names}
        self.layers, self.active, self.scoring = backbone.vision_layers, active, scoring
        self._rows: dict[str, torch.Tensor] = {}  # name -> (crops of the batch, P)

    def install(self, hooks: list) -> None:
        for name, block in self.blocks.items():
            attn = self.layers[block].self_attn
            hooks.append(attn.k_proj.register_forward_hook(self._capture(name, attn)))

    def _capture(self, name: str, attn):
        def hook(_k_proj, args, keys):
            if self.active():
                with self.scoring():
                    self._rows[name] = layer_cls_attention(args[0], attn.q_proj, keys, attn.num_heads,
                                                           attn.scale)[:, 1:]
        return hook

    def image(self, name: str, first: int, n_crops: int) -> torch.Tensor:
        """``(1, n_crops, P)``: signal ``name`` of the image whose crops are the tower's batch rows
        ``first .. first + n_crops``."""
        return self._rows[name][first: first + n_crops][None]
