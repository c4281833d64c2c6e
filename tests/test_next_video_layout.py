"""LLaVA-NeXT-Video's video runs as backbones/pooled_video.py describes them, against the model's own
``get_video_features``: cell ``(f, r, c)`` of the unit a method sees is the projector's output of the mean of
frame ``f``'s 2x2 patches at rows ``2r, 2r+1`` and columns ``2c, 2c+1`` (the tower's feature layer, CLS dropped),
and ``pack`` of the projector's input gives each token the pooled feature behind it (``projector_input``)."""

from __future__ import annotations

import torch

from tokensieve.backbones.pooled_video import PooledVideoLayout


def test_each_cell_is_its_frames_2x2_patches_pooled_then_projected(next_video):
    model = next_video.model.model
    frames = torch.randn(2, 3, 3, 28, 28)  # two videos of three frames
    seen = []
    hook = model.multi_modal_projector.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        with torch.no_grad():
            theirs = model.get_video_features(frames, return_dict=True).pooler_output  # (2, 3 * 2 * 2, d)
            tower = model.vision_tower(frames.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
    finally:
        hook.remove()
    layout = next_video.video_layout(3)
    assert layout == PooledVideoLayout(3, 4, pooled_before_projector=True, newline=False)
    assert len(layout) == 3 * 2 * 2 == theirs.shape[1] and not layout.is_newline.any()
    unit = layout.unit()
    assert (unit.kind, unit.frames, unit.rows, unit.cols) == ("video", 3, 2, 2)
    grids = tower.view(2, 3, 4, 4, -1)  # (videos, frames, rows, cols, d_v)
    for v in range(2):
        pooled = torch.stack([grids[v, f, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2].mean((0, 1))
                              for f in range(unit.frames) for r in range(unit.rows) for c in range(unit.cols)])
        captured = seen[0].unflatten(0, (2, 3))[v]  # the projector's input for video v's frames
        torch.testing.assert_close(layout.pack(captured)[unit.cells], pooled, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(model.multi_modal_projector(pooled), theirs[v][unit.cells], rtol=1e-5,
                                       atol=1e-6)
