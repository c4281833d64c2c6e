"""The ``llm.0`` budget split over an anyres image's base and crops (``attach(..., split=...)``), on the tiny
random LLaVA-NeXT: a wide (1x2 crops, 3 parts of 16 tokens), a square (2x2, 5 parts) and a tall (2x1, 3
parts) image in one batch, no letterbox cut. ``all`` is the path without a split; ``even`` and ``hired``
give each part its share, and the method chooses within each part."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from tiny_llava_next import ROWS

from tokensieve.attach import attach
from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, Method, Selection, SiteInputs
from tokensieve.methods.hired import HiRED

SIZES = [size for _, size in ROWS]  # wide, square, tall


def kept_of(handle) -> list[torch.Tensor]:
    """Per image the positions in its packed run that the llm.0 stage kept."""
    return [row[row >= 0] for row in handle.last_kept[str(handle.stages[0])]]


def per_part(llava_next, batch, kept) -> list[list[int]]:
    """Per image the kept tokens of each part (base, then the crops)."""
    layouts = [llava_next.image_layout(size) for size in batch["image_sizes"].tolist()]
    return [torch.bincount(layout.part[k], minlength=layout.n_crops).tolist() for k, layout in zip(kept, layouts)]


@dataclass
class First(Method):
    """Keeps the first ``keep`` of the tokens it is given, and records ``(tokens, keep)`` of every call."""

    name = "first"
    stages = ("llm",)
    calls: list = field(default_factory=list)

    def select(self, inputs: SiteInputs) -> Selection:
        self.calls.append((inputs.tokens.shape[1], inputs.keep))
        return Selection(torch.arange(inputs.keep)[None])


@dataclass
class MostCropAttended(Method):
    """Keeps the tokens whose crop patch the tower's CLS attends most (HiRED's choice within a part)."""

    name = "most_crop_attended"
    stages = ("llm",)
    signals = ("crop_cls_attention", "anyres_source")

    def select(self, inputs: SiteInputs) -> Selection:
        crops, source = inputs.signal("crop_cls_attention"), inputs.signal("anyres_source")
        scores = crops[0].flatten()[source[0]]
        return Selection(scores.topk(inputs.keep).indices.sort().values[None])


# Hand-computed shares: floor(K / parts) each, the remainder to the base; at 47 the wide and tall images'
# base cannot hold its 17 (16 tokens), so its last one goes to the first crop.
EVEN = {10: [[4, 3, 3], [2, 2, 2, 2, 2], [4, 3, 3]], 47: [[16, 16, 15], [11, 9, 9, 9, 9], [16, 16, 15]]}


@pytest.mark.parametrize("budget", EVEN)
@pytest.mark.parametrize("method", ["random", "divprune"])
def test_even_gives_each_part_its_share_exactly(llava_next, next_batch, method, budget):
    handle = attach(llava_next, method, budget, site="llm.0", split="even")
    with torch.no_grad():
        llava_next.forward(**next_batch)
    assert per_part(llava_next, next_batch, kept_of(handle)) == EVEN[budget]
    assert handle.last_counts[str(handle.stages[0])][1] == budget
    handle.detach()


def test_the_method_chooses_within_each_part_with_its_budget(llava_next, next_batch):
    method = First()
    handle = attach(llava_next, method, 10, site="llm.0", split="even")
    with torch.no_grad():
        llava_next.forward(**next_batch)
    kept = kept_of(handle)
    handle.detach()
    assert method.calls == [(16, 4), (16, 3), (16, 3)] + [(16, 2)] * 5 + [(16, 4), (16, 3), (16, 3)]
    for k, size, shares in zip(kept, next_batch["image_sizes"].tolist(), EVEN[10]):
        layout = llava_next.image_layout(size)
        firsts = [layout.candidates[layout.part[layout.candidates] == p][:n] for p, n in enumerate(shares)]
        assert torch.equal(k, torch.cat(firsts).sort().values)


def test_hired_split_with_hireds_choice_is_hired(llava_next, next_batch):
    """HiRED's rule under split 'hired', each part then keeping its most CLS-attended patches, is HiRED
    itself (newlines kept in both): the split reads the same first-block attention of the base image."""
    budget = Budget(ratio=0.5, rounding="down")
    kept = {}
    for name, method, split in [("split", MostCropAttended(), "hired"), ("hired", HiRED(newlines="keep"), "all")]:
        handle = attach(llava_next, method, budget, site="llm.0", split=split)
        with torch.no_grad():
            kept[name] = (llava_next.forward(**next_batch).logits, kept_of(handle))
        handle.detach()
    assert torch.equal(kept["split"][0], kept["hired"][0])
    for ours, theirs in zip(kept["split"][1], kept["hired"][1]):
        assert torch.equal(ours, theirs)
    bases = [part[0] for part in per_part(llava_next, next_batch, kept["split"][1])]
    assert bases == [12, 16, 12]  # int(keep * 0.5) of 24, 40, 24, at most the base's 16


@pytest.mark.parametrize("method,site", [("random", "llm.0"), ("divprune", "llm.0"), ("fastv", "llm.1")])
def test_all_is_the_path_without_a_split(llava_next, next_batch, method, site):
    results = []
    for split in ({}, {"split": "all"}):
        handle = attach(llava_next, method, 0.5, site=site, **split)
        with torch.no_grad():
            results.append((llava_next.forward(**next_batch).logits, kept_of(handle)))
        handle.detach()
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("split", ["even", "hired"])
def test_a_budget_below_one_token_per_part_is_refused(llava_next, next_batch, split):
    handle = attach(llava_next, "random", 4, site="llm.0", split=split)  # the square image has 5 parts
    with pytest.raises(TokensieveError, match=rf"budget 4 < 5 parts \(base \+ 4 crops\): split '{split}'") as err:
        llava_next.forward(**next_batch)
    handle.detach()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method,site,split,message", [
    ("random", "llm.0", "halves", "split 'halves': LLaVA-NeXT offers split all, even, hired"),
    ("fastv", "llm.1", "even", "no stage acts at llm.0"),
    ("hired", "llm.0", "even", "hired splits its budget by its own rule"),
])
def test_splits_it_cannot_run_are_refused_at_attach(llava_next, method, site, split, message):
    with pytest.raises(TokensieveError, match=message) as err:
        attach(llava_next, method, 0.5, site=site, split=split)
    assert "\n" not in str(err.value)
    assert not llava_next.sessions


def test_a_backbone_without_parts_refuses_a_split(backbone):
    with pytest.raises(TokensieveError, match="LlavaBackbone offers split all") as err:
        attach(backbone, "random", 0.5, split="even")
    assert "\n" not in str(err.value)
