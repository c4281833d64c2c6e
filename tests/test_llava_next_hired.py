"""HiRED on the tiny random LLaVA-NeXT (a wide 1x2, a square 2x2 and a tall 2x1 image in one batch, 16
patches per crop, no letterbox cut): the per-crop CLS rows the adapter gives it at ``llm.0``, its budget
per image, newlines dropped as in the reference (or kept), and its refusals."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from tiny_llava_next import NEWLINES, ROWS, TOKENS

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, SiteInputs
from tokensieve.methods.hired import HiRED

SIZES = [size for _, size in ROWS]
PARTS = {"wide": 3, "square": 5, "tall": 3}  # base + crops
P = 16  # patches per crop


@dataclass
class RecordingHiRED(HiRED):
    """HiRED that keeps the signals it was given, per image."""

    seen: list = field(default_factory=list)

    def select(self, inputs: SiteInputs):
        self.seen.append({name: inputs.signal(name) for name in self.signals})
        return super().select(inputs)


def cls_rows(llava_next, batch, block: int) -> list[torch.Tensor]:
    """Per image ``(n_crops, P)``: block ``block``'s CLS attention rows per crop, from the tower's own hidden
    states (the block's input through its layer_norm1, its q/k projections, softmax per head, mean)."""
    layouts = [llava_next.image_layout(s) for s in batch["image_sizes"].tolist()]
    pixels = torch.cat([p[: layout.n_crops] for p, layout in zip(batch["pixel_values"], layouts)])
    tower = llava_next.model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[block]
        layer = tower.encoder.layers[block]
        x = layer.layer_norm1(hidden)
        heads = layer.self_attn.num_heads
        q = layer.self_attn.q_proj(x[:, :1]).view(len(x), 1, heads, -1).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(len(x), x.shape[1], heads, -1).transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1).mean(1)[:, 0, 1:]
    return list(att.split([layout.n_crops for layout in layouts]))


def test_the_crop_rows_are_the_towers_attention(llava_next, next_batch):
    method = RecordingHiRED()
    handle = attach(llava_next, method, 0.5)
    assert str(handle.stages[0].site) == "llm.0"
    with torch.no_grad():
        llava_next.forward(**next_batch)
    handle.detach()
    feature, first = cls_rows(llava_next, next_batch, 1), cls_rows(llava_next, next_batch, 0)
    for seen, size, f, b in zip(method.seen, SIZES, feature, first):
        assert seen["crop_cls_attention"].shape == (1, PARTS[size], P)
        assert torch.allclose(seen["crop_cls_attention"][0], f, atol=1e-6)
        assert torch.allclose(seen["first_block_crop_cls_attention"][0], b, atol=1e-6)
        layout = llava_next.image_layout(next_batch["image_sizes"][SIZES.index(size)].tolist())
        assert torch.equal(seen["anyres_source"][0], layout.source[~layout.is_newline])


def test_budget_per_image_split_over_base_and_crops(llava_next, next_batch):
    """A ratio of each image's own base and crop tokens (48, 80, 48), rounded down as the reference's
    int(): 24, 40, 24. The base keeps int(keep * alpha) (at most its 16); the crops share the rest, each
    share rounded down (fewer than one token lost per crop); each part keeps its most attended patches."""
    method = RecordingHiRED()
    handle = attach(llava_next, method, Budget(ratio=0.5, rounding="down"))
    with torch.no_grad():
        llava_next.forward(**next_batch)
    kept = [row[row >= 0] for row in handle.last_kept[str(handle.stages[0])]]
    handle.detach()
    for k, size, seen, keep, base in zip(kept, SIZES, method.seen, [24, 40, 24], [12, 16, 12]):
        layout = llava_next.image_layout(next_batch["image_sizes"][SIZES.index(size)].tolist())
        part = layout.part[k]
        assert int((part == 0).sum()) == base
        crops = int((part > 0).sum())
        assert keep - base - (PARTS[size] - 1) < crops <= keep - base, size
        scores = seen["crop_cls_attention"][0].flatten()[layout.source]
        for p in range(PARTS[size]):
            ours, others = layout.part[k] == p, (layout.part == p)
            others[k] = False
            if ours.any() and others.any():
                assert scores[k][ours].min() >= scores[others].max(), (size, p)


@pytest.mark.parametrize("newlines,entering", [("drop", 0), ("keep", 1)])
def test_newlines_are_dropped_as_the_reference_does_or_kept(llava_next, next_batch, newlines, entering):
    handle = attach(llava_next, HiRED(newlines=newlines), 0.5)
    with torch.no_grad():
        inputs = llava_next.prepare(**next_batch)
    kept = [int((row >= 0).sum()) for row in handle.last_kept[str(handle.stages[0])]]
    handle.detach()
    text = next_batch["attention_mask"].sum(1) - torch.tensor([TOKENS[s] for s in SIZES])
    expected = text + torch.tensor(kept) + entering * torch.tensor([NEWLINES[s] for s in SIZES])
    assert torch.equal(inputs.attention_mask.sum(1), expected)


def test_a_budget_below_one_token_per_part_is_refused_in_one_line(llava_next, next_batch):
    handle = attach(llava_next, "hired", 4)  # the wide image's 3 parts take it; the square's 5 do not
    with pytest.raises(TokensieveError, match="budget of 4 tokens is smaller than the image's 5 parts") as err:
        llava_next.forward(**next_batch)
    handle.detach()
    assert "\n" not in str(err.value)


def test_only_llm0_offers_its_signals(llava_next):
    with pytest.raises(TokensieveError, match="which llm.1 does not provide") as err:
        attach(llava_next, "hired", 0.5, site="llm.1")
    assert "\n" not in str(err.value)
