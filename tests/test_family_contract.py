"""DESIGN.md's invariants for every method at every site it runs at, on every family built on the backbone
contract: the tiny random Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video
(LLaVA-1.5: tests/test_registry_contract.py). Each method runs on a batch of images of different sizes (on
Qwen-VL one row holds two images) and, if it takes videos, on a batch with a short video beside an image:

- keep-all is the plain model, bit for bit (DyCoke's reference order keeps every token in another
  order; HiRED's reference caps each crop's share at its tokens, so it has no keep-all), and detach
  restores it bit for bit;
- budgets exact: a count keeps that many tokens of every image (before the LLM) or row (inside it); a
  share (PyramidDrop's) that share of the tokens before each stage, counted down;
- a batch padded on the right gives what it gives padded on the left (last logits, kept tokens);
- a padded batch equals each row alone (last logits, kept tokens), and so does a batch holding each row
  beside its twin (the same prompt and media sizes, other media), where a stage chooses for consecutive
  images or rows of one size in one call (as on an accelerator: ``call_runs.BATCH_ON_CPU``);
- ``generate`` with the cache equals the steps run again without it, the prompt's choice replayed (a method
  reading the text, FastV say, would choose anew with the answer's tokens in the prompt);
- soft mode with a binary mask equals hard mode (last logits, kept tokens and counts).

:data:`RUNS` lists what runs per family (tests/test_models_doc.py holds every method's default and the
variants docs/models.md names on each family; the LLaVA-NeXT families' registry tests hold every site). Methods read
what the tiny models have: CDPruner a tiny CLIP as wide as the tower, PyramidDrop layers 1 and 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import pytest
import tiny_llava_next
import tiny_next_video
import tiny_onevision
import tiny_qwen
import torch
from padding_side import right_padded
from tiny_clip_text import save_tiny_clip

from tokensieve.attach import attach
from tokensieve.backbones import call_runs
from tokensieve.backbones.load import load_backbone
from tokensieve.errors import TokensieveError
from tokensieve.method import Budget, Selection
from tokensieve.methods import create_method, method_class

TWIN = 100  # a row's twin: its media seeded TWIN + its index
COUNT = 5  # the count budget: below the smallest image's tokens (Qwen's small image: 6), HiRED's 5 parts
PYRAMIDDROP = {"name": "pyramiddrop", "positions": "original", "layers": (1, 2)}
DART = {"name": "dart", "exact_budget": True}  # its paper's rule keeps a multiple of its pivots
RECEIVED = {"importance": "received_attention"}  # the Qwen ports of methods reading CLS attention (ours)
# (label, method config, site) per family group; a method's own site when None.
# SparseVLM's rank sets each row's count (the budget only caps it); on Qwen-VL with original positions (ours)
SPARSEVLM = {"name": "sparsevlm", "layers": (1, 2), "scale": 0.8, "bias": 0.0}
QWEN_SPARSEVLM = {**SPARSEVLM, "positions": "original"}
LLAVA_NEXT_RUNS = [("random@llm.0", "random", "llm.0"), ("random@llm.1", "random", "llm.1"),
                   ("divprune@llm.0", "divprune", "llm.0"), ("divprune@llm.1", "divprune", "llm.1"),
                   ("cdpruner", "cdpruner", None), ("fastv@llm.1", "fastv", "llm.1"), ("dart@llm.1", DART, "llm.1"),
                   ("pyramiddrop", PYRAMIDDROP, None), ("layer_pruner@llm.0", "layer_pruner", "llm.0"),
                   ("layer_pruner@llm.1", "layer_pruner", "llm.1")]
NEXT_NAMES = ("llava_next", "llava_onevision", "llava_next_video")
RUNS = {
    "qwen2_vl": [("random@projector", "random", None), *LLAVA_NEXT_RUNS, ("sparsevlm", QWEN_SPARSEVLM, None),
                 ("dycoke", {"name": "dycoke", "order": "positions"}, None),  # Qwen-VL keeps grid order (ours)
                 ("visionzip", {"name": "visionzip", **RECEIVED, "cls": "drop", "order": "positions"}, None),
                 ("fastervlm", {"name": "fastervlm", **RECEIVED}, None),
                 ("vispruner", {"name": "vispruner", **RECEIVED}, None),
                 ("anchor", {"name": "anchor", **RECEIVED, "k_anchors": 2}, "projector"),
                 ("token_merger", "token_merger", None)],
    "llava_next": [*LLAVA_NEXT_RUNS, ("hired", "hired", None)],
    "llava_onevision": [*LLAVA_NEXT_RUNS, ("dycoke", "dycoke", None)],
    "llava_next_video": [*LLAVA_NEXT_RUNS, ("hired", "hired", None), ("dycoke", "dycoke", None)],
}
for name in NEXT_NAMES:  # the released defaults: positions renumbered, recycled tokens (SparseVLM)
    RUNS[name] += [("sparsevlm", SPARSEVLM, None),
                   ("pyramiddrop (renumbered)", {**PYRAMIDDROP, "positions": "renumbered"}, None)]
RUNS["qwen2_5_vl"] = RUNS["qwen2_vl"]
# Qwen3-VL's DeepStack features are added after layers 0 and 1 of the tiny model: tokens made after them
RUNS["qwen3_vl"] = [run if run[0] != "sparsevlm" else ("sparsevlm", {**QWEN_SPARSEVLM, "layers": (2,)}, None)
                    for run in RUNS["qwen2_vl"]]
CASES = [(family, label) for family in RUNS for label, _, _ in RUNS[family]]


@dataclass
class Family:
    """A tiny model of one family and its batches, each ``rows[kind] = (rows, video frames)``: ``images`` (rows
    of different image sizes) and, where the family takes videos, ``video`` (a short video beside an image)
    and ``long video`` (two videos of enough frames for DyCoke, questions of different lengths)."""

    name: str
    backbone: object
    inputs: Callable  # (rows, first, frames) -> processor inputs of rows, row b's media seeded first + b
    rows: dict
    batches: dict = field(default_factory=dict)
    plain: dict = field(default_factory=dict)

    def batch(self, kind: str) -> dict:
        if kind not in self.batches:
            self.batches[kind] = self.alone(kind, slice(None))
        return self.batches[kind]

    def plain_logits(self, kind: str) -> torch.Tensor:
        if kind not in self.plain:
            with torch.no_grad():
                self.plain[kind] = self.backbone.forward(**self.batch(kind)).logits
        return self.plain[kind]

    def alone(self, kind: str, b: int | slice) -> dict:
        """Row ``b`` of ``kind`` as a batch of its own (a slice: those rows)."""
        rows, frames = self.rows[kind]
        return self.inputs(rows[b], b.start or 0, frames) if isinstance(b, slice) else self.inputs([rows[b]], b, frames)

    @property
    def suppressed(self) -> list[int]:
        """Placeholders (they would read as images) and the end (a random model would stop at once)."""
        config = self.backbone.model.config
        ids = [getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id",
                                                        "video_token_index")]
        return sorted({i for i in ids if i is not None} | {self.backbone.processor.tokenizer.eos_token_id})


# The tiny model of each LLaVA-NeXT family: its module and the function saving it.
NEXT_FAMILIES = {"llava_next": (tiny_llava_next, tiny_llava_next.save_tiny_llava_next),
                 "llava_onevision": (tiny_onevision, tiny_onevision.save_tiny_onevision),
                 "llava_next_video": (tiny_next_video, tiny_next_video.save_tiny_next_video)}


@cache
def family(name: str, folder) -> Family:
    """The tiny model of ``name`` saved in ``folder`` and loaded as a user would (``load_backbone``)."""
    if name.startswith("qwen"):
        tiny_qwen.save_tiny_qwen(name, folder)
        backbone = load_backbone(str(folder))
        four, twelve = tiny_qwen.VIDEO_SHAPE[0], 12  # 2 and 6 temporal patches
        rows = {"images": (tiny_qwen.ROWS, four),
                "video": ([("what is the colour ?", ["video"]), ("what shape is left and right ?", ["small", "big"])],
                          four),
                "long video": ([("what is the colour ?", ["video"]), ("what happens left and right ?", ["video"])],
                               twelve)}
        return Family(name, backbone, lambda rows, first, frames: tiny_qwen.inputs(backbone, rows, first, frames),
                      rows)
    module, save = NEXT_FAMILIES[name]
    save(folder)
    backbone = load_backbone(str(folder))
    rows = {"images": ([row for row in module.ROWS if row[1] != "video"], None)}  # None: no video there
    if name != "llava_next":
        rows["video"] = ([("what happens ?", "video"), ("what colour ?", "wide")], 4)
        rows["long video"] = ([("what happens ?", "video"), ("what is the colour ?", "video")], 8)
    return Family(name, backbone, lambda rows, first, frames: module.inputs(
        backbone.processor, rows, first=first, **({} if frames is None else {"frames": frames})), rows)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: tmp_path_factory.mktemp(name) for name in RUNS}


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """A method config -> an instance for the tiny models (CDPruner's CLIP as wide as each tower)."""
    clips = {}

    def made(spec, tower_width: int):
        method = create_method(spec)
        if method.name == "cdpruner":
            if tower_width not in clips:
                clips[tower_width] = save_tiny_clip(tmp_path_factory.mktemp("clip"), tower_width)
            method = create_method(spec, text_encoder=str(clips[tower_width]))
        return method
    return made


def case(folders, make, name: str, label: str):
    """``(family, a fresh method instance, site, the batch kinds it runs on)`` of one case."""
    fam = family(name, folders[name])
    spec, site = next((spec, site) for lab, spec, site in RUNS[name] if lab == label)
    if name.startswith("qwen"):  # the merger's input: its 2 x 2 patches
        width = fam.backbone.merge_unit * fam.backbone.visual.blocks[0].norm1.weight.shape[0]
    else:
        width = fam.backbone.model.config.vision_config.hidden_size
    method = lambda: make(spec, width)  # noqa: E731  (a fresh one per attach: methods hold state)
    of = method_class(method().name)
    kinds = ["long video"] if of.needs_video else [k for k in ("images", "video") if k in fam.rows and (
        k == "images" or of.handles_video)]
    return fam, method, site, kinds


def adaptive(method) -> bool:
    """True for a method whose rule sets each row's count, the budget only capping it (SparseVLM's rank)."""
    return method.count_per_row and all(b.ratio == 1.0 for _, b in method.schedule("llm", Budget(count=COUNT), 3))


def hard_only(method) -> bool:
    """True for a method soft mode cannot express: tokens of its own, or positions renumbered after a drop."""
    return method.makes_extra_tokens or getattr(method, "renumbers_positions", False)


def kept_of(handle) -> list[torch.Tensor]:
    """Per image (before the LLM) or row (inside it) the indices its first stage kept, padding left out."""
    return [row[row >= 0] for row in handle.last_kept[str(handle.stages[0])]]


def budget_for(method) -> float | int:
    """A share for a method whose budget is one (PyramidDrop's), else a count: :data:`COUNT`, or 16 for
    DyCoke, which keeps whole frames first (12 tokens of these videos)."""
    return 0.5 if method.budget_is_share else 16 if method.name == "dycoke" else COUNT


@pytest.mark.parametrize(("name", "label"), CASES)
def test_keep_all_budgets_and_detach(folders, make, name, label):
    fam, method, site, kinds = case(folders, make, name, label)
    bb = fam.backbone
    for kind in kinds:
        batch, plain = fam.batch(kind), fam.plain_logits(kind)
        with torch.no_grad():
            handle = attach(bb, method(), 1.0, site=site)
            try:
                logits, used = bb.forward(**batch).logits, handle.stages[0].method
                counts = handle.last_counts.values()
                if getattr(used, "own_order", None):  # every token, a cut frame's in the reference's order
                    assert all(after == before for before, after in counts)
                elif adaptive(used):  # its rule's count, capped at all but one token
                    assert all(after <= before for before, after in counts)
                elif used.name != "hired":  # HiRED has no keep-all (module docstring)
                    assert torch.equal(logits, plain), f"{label} keep-all ({kind})"
            finally:
                handle.detach()
            pruning = method()
            budget = budget_for(pruning)
            handle = attach(bb, pruning, budget, site=site)
            try:
                bb.forward(**batch)
                for stage, (before, after) in handle.last_counts.items():  # a full-rank SparseVLM stage keeps all
                    assert after < before or adaptive(pruning) and stage != str(handle.stages[0]), \
                        f"{stage} pruned nothing ({kind})"
                counts = [len(k) for k in kept_of(handle)]
                if adaptive(pruning):  # no budget to meet; its recycled tokens are in every stage's run
                    assert all(bool((kept == -3).any()) for kept in handle.last_kept.values()), label
                elif isinstance(budget, int):  # HiRED: at most (its parts' shares rounded down)
                    assert all(c == budget or pruning.name == "hired" and c <= budget for c in counts), \
                        f"{label} kept {counts} of a budget of {budget} ({kind})"
                else:  # the first stage keeps the share of each row (counts here are rounded means), then
                    before, after = handle.last_counts[str(handle.stages[0])]  # int(share x before) per row
                    assert abs(budget * before - after) <= 1, f"{label}: {after} of {before} ({kind})"
                    stages = [[len(r[r >= 0]) for r in handle.last_kept[str(st)]] for st in handle.stages]
                    assert len(stages) == 2 and all(later == [int(budget * n) for n in earlier]
                                                    for earlier, later in zip(stages, stages[1:])), (label, stages)
            finally:
                handle.detach()
            assert torch.equal(bb.forward(**batch).logits, plain), f"{label}: detach restores the model ({kind})"


@pytest.mark.parametrize(("name", "label"), CASES)
def test_padded_batch_equals_each_row_alone(folders, make, name, label, monkeypatch):
    fam, method, site, kinds = case(folders, make, name, label)
    bb = fam.backbone
    for kind in kinds:
        pruning = method()
        handle = attach(bb, pruning, budget_for(pruning), site=site)
        try:
            with torch.no_grad():
                together, kept = bb.forward(**fam.batch(kind)).logits[:, -1], kept_of(handle)
                at, twins, twins_kept = 0, [], []
                rows, frames = fam.rows[kind]
                for b in range(len(rows)):
                    single = bb.forward(**fam.alone(kind, b)).logits[:, -1]
                    torch.testing.assert_close(together[b:b + 1], single, rtol=1e-5, atol=1e-5)
                    alone = kept_of(handle)
                    for k in alone:  # before the LLM one row per image, inside it one per prompt row
                        assert torch.equal(kept[at], k), f"{label} row {b} keeps other tokens alone ({kind})"
                        at += 1
                    # its twin: the same prompt and media sizes, other media
                    twins += [single, bb.forward(**fam.inputs([rows[b]], [TWIN + b], frames)).logits[:, -1]]
                    twins_kept += alone + kept_of(handle)
                assert at == len(kept)
                # each row then its twin: a stage chooses for consecutive images or rows of one size in one call
                # (on an accelerator; here too, for the test)
                paired = fam.inputs([row for row in rows for _ in "ab"], [s for b in range(len(rows))
                                                                         for s in (b, TWIN + b)], frames)
                with monkeypatch.context() as patch:
                    patch.setattr(call_runs, "BATCH_ON_CPU", True)
                    together_twins = bb.forward(**paired).logits[:, -1]
                torch.testing.assert_close(together_twins, torch.cat(twins), rtol=1e-5, atol=1e-5)
                assert [k.tolist() for k in kept_of(handle)] == [k.tolist() for k in twins_kept], \
                    f"{label}: a row beside its twin keeps other tokens than alone ({kind})"
        finally:
            handle.detach()


@pytest.mark.parametrize(("name", "label"), CASES)
def test_a_batch_padded_on_the_right_gives_what_it_gives_padded_on_the_left(folders, make, name, label):
    fam, method, site, kinds = case(folders, make, name, label)
    pruning = method()
    handle = attach(fam.backbone, pruning, budget_for(pruning), site=site)
    try:
        for kind in kinds:
            with torch.no_grad():
                left, left_kept = fam.backbone.forward(**fam.batch(kind)).logits[:, -1], kept_of(handle)
                right = fam.backbone.forward(**right_padded(fam.batch(kind))).logits[:, -1]
            torch.testing.assert_close(right, left, rtol=1e-5, atol=1e-5)
            assert [k.tolist() for k in kept_of(handle)] == [k.tolist() for k in left_kept]
    finally:
        handle.detach()


def recording(method):
    """``method``, recording every ``Selection`` it returns (in call order) in ``method.recorded``."""
    method.recorded = []
    select = method.select

    def recorded(inputs):
        sel = select(inputs)
        method.recorded.append(sel)
        return sel
    method.select = recorded
    return method


def replaying(method, selections: list[Selection]):
    """``method`` giving back ``selections`` pass after pass, in call order."""
    calls = iter(range(10**6))
    method.select = lambda inputs: selections[next(calls) % len(selections)]
    return method


def greedy_without_cache(fam: Family, batch: dict, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens (never a suppressed one), the whole sequence run again at every step."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        step = dict(batch, input_ids=ids, attention_mask=mask)
        if "mm_token_type_ids" in step:
            step["mm_token_type_ids"] = None  # computed again from the ids
        logits = fam.backbone.forward(**step, use_cache=False).logits[:, -1]
        token = logits.index_fill(1, torch.tensor(fam.suppressed), -torch.inf).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize(("name", "label"), CASES)
def test_generate_with_cache_equals_steps_without(folders, make, name, label):
    fam, method, site, kinds = case(folders, make, name, label)
    bb = fam.backbone
    for kind in kinds:
        batch, pruning = fam.batch(kind), recording(method())
        handle = attach(bb, pruning, budget_for(pruning), site=site)
        try:
            with torch.no_grad():
                new = bb.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=fam.suppressed)
        finally:
            handle.detach()
        chosen = pruning.recorded
        handle = attach(bb, replaying(method(), chosen), budget_for(pruning), site=site)
        try:
            with torch.no_grad():
                steps = greedy_without_cache(fam, batch, 3)
        finally:
            handle.detach()
        assert torch.equal(new, steps), f"{label} ({kind})"


@pytest.mark.parametrize(("name", "label"), CASES)
def test_soft_with_a_binary_mask_equals_hard(folders, make, name, label):
    fam, method, site, kinds = case(folders, make, name, label)
    bb = fam.backbone
    for kind in kinds:
        if hard_only(method()):
            with pytest.raises(TokensieveError, match=r"^[^\n]*soft mode cannot[^\n]*$"):
                attach(bb, method(), budget_for(method()), site=site, mode="soft")
            assert not bb.sessions
            return
        results = {}
        for mode in ("hard", "soft"):
            pruning = method()
            handle = attach(bb, pruning, budget_for(pruning), site=site, mode=mode)
            try:
                with torch.no_grad():
                    if mode == "soft" and getattr(pruning, "order", None) == "similarity":
                        with pytest.raises(TokensieveError, match=r"^[^\n]*order[^\n]*$"):
                            bb.forward(**fam.batch(kind))
                        return
                    results[mode] = bb.forward(**fam.batch(kind)).logits[:, -1], handle.last_counts, kept_of(handle)
            finally:
                handle.detach()
        (hard, hard_counts, hard_kept), (soft, soft_counts, soft_kept) = results["hard"], results["soft"]
        assert hard_counts == soft_counts and all(torch.equal(h, s) for h, s in zip(hard_kept, soft_kept)), kind
        torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-5)
