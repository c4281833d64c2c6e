"""ToMe inside a LLaVA vision tower: the session merges in the blocks up to the feature layer, as
the released mechanism does in a ViT, and the LLM receives the tokens in ToMe's order."""

from __future__ import annotations

import torch

from tokensieve.attach import attach
from tokensieve.backbones.block_merging import BlockMerger
from tokensieve.backbones.llava_prompt import encode


def test_the_llm_receives_the_tower_merged_block_by_block(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples)
    handle = attach(backbone, "tome", 16, site="vision.0")
    try:
        inputs = backbone.prepare(**batch)
    finally:
        handle.detach()
    is_image = inputs.input_ids == backbone.image_token_id
    received = inputs.inputs_embeds[is_image].view(len(tiny_samples), 16, -1)

    # The same tower with ToMe's merger installed by hand: 16 merges in each of its 3 blocks.
    merger = BlockMerger(backbone.vision_layers, {0: 16, 1: 16, 2: 16}, class_token=True)
    hooks = merger.install()
    try:
        tower = backbone.vision_tower(batch["pixel_values"], output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    features = tower.hidden_states[backbone.feature_hidden_index][:, 1:]  # the default strategy drops CLS
    torch.testing.assert_close(received, backbone.projector(features))
    (kept,) = handle.last_kept.values()  # patches behind each token, in ToMe's order
    assert torch.equal(kept, merger.survivors[:, 1:] - 1)
    assert handle.last_counts == {"tome@vision.0:16": (64, 16)}


def test_a_cut_after_the_merging_blocks_keeps_what_the_tokens_stand_for(backbone, tiny_samples):
    batch = encode(backbone.processor, tiny_samples)
    handle = attach(backbone, [("tome", "vision.0", 32), ("random", "vision.2", 8)])
    try:
        backbone.forward(**batch)
    finally:
        handle.detach()
    merged, cut = handle.last_kept.values()
    assert merged.shape[1] == 32 and cut.shape[1] == 8
    assert all(set(c) <= set(m) for m, c in zip(merged.tolist(), cut.tolist()))
