"""Stage-2 auxiliary lookups: every object a question mentions is looked up at its mention.

Trained on the answer alone, the small LLM has to discover a two-hop circuit (the answer
slot finds the question's object word, that word finds the object's patches) and stayed at
the question-only prior for thousands of steps, even given perfect symbolic patch features.
With these losses each mention word learns the one-hop lookup itself (a colour word: how many
objects have that colour, and the shape and place of the only one; a shape word: likewise; a
"colour shape" pair: whether it exists and where; the second object of a spatial question:
how it lies relative to the first, and whether the asked relation holds), and the answer
slot only has to read the mention. On symbolic features this took colour/shape/count
questions from the prior to >= 0.97 in 1,000 steps. The probe heads are discarded after
training: the checkpoint stays an ordinary LLaVA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokensieve.data.synthetic import COLOURS, COUNT_WORDS, SHAPES, Sample

# Relative placement of object a to object b along one axis: a before b, a after b, overlapping.
BEFORE, AFTER, OVERLAP = 0, 1, 2


def lookup_sizes(grid: int) -> dict[str, int]:
    """Classes of every lookup a mention is trained to make."""
    return {"count": len(COUNT_WORDS), "shape": len(SHAPES), "colour": len(COLOURS), "exists": 2,
            "row": grid, "col": grid, "relrow": 3, "relcol": 3, "holds": 2}


def _placement(a: int, b: int) -> int:
    """Where a 2-patch-wide block at ``a`` lies relative to one at ``b`` on the same axis."""
    return BEFORE if a <= b - 2 else AFTER if a >= b + 2 else OVERLAP


def mention_targets(sample: Sample, words: list[str]) -> list[tuple[int, str, int]]:
    """``(position in words, lookup, class)`` for every object mention of the question.

    words: the prompt's tokens (a word-level tokenizer: one token per word).
    """
    colours, shapes = [o.colour for o in sample.objects], [o.shape for o in sample.objects]
    out: list[tuple[int, str, int]] = []
    pairs = []
    for i, word in enumerate(words):
        if word in COLOURS:  # alone or as the first word of a pair
            out.append((i, "count", colours.count(word)))
            if colours.count(word) == 1:
                obj = sample.objects[colours.index(word)]
                out += [(i, "shape", SHAPES.index(obj.shape)), (i, "row", obj.row), (i, "col", obj.col)]
        elif word in SHAPES and i and words[i - 1] in COLOURS:  # "red circle": the pair, at its last word
            hit = [o for o in sample.objects if o.colour == words[i - 1] and o.shape == word]
            out.append((i, "exists", int(bool(hit))))
            if hit:
                out += [(i, "row", hit[0].row), (i, "col", hit[0].col)]
                pairs.append((i, hit[0]))
        elif word in SHAPES:
            out.append((i, "count", shapes.count(word)))
            if shapes.count(word) == 1:
                obj = sample.objects[shapes.index(word)]
                out += [(i, "colour", list(COLOURS).index(obj.colour)), (i, "row", obj.row), (i, "col", obj.col)]
    if sample.family == "spatial" and len(pairs) == 2:
        (_, a), (i, b) = pairs
        out += [(i, "relrow", _placement(a.row, b.row)), (i, "relcol", _placement(a.col, b.col)),
                (i, "holds", int(sample.answer == "yes"))]
    return out


def batch_targets(samples: list[Sample], input_ids: torch.Tensor, tokens: list[list[str]]) -> torch.Tensor:
    """``(R, 4)`` rows ``[sample, position from the end of the row, lookup index, class]``.

    Positions count from the end so they stay right when visual tokens are removed (prompts
    are left-padded and the question follows the image). tokens: each row's token strings.
    """
    names = list(lookup_sizes(1))
    rows = []
    for b, (sample, words) in enumerate(zip(samples, tokens)):
        for pos, lookup, target in mention_targets(sample, words):
            rows.append([b, input_ids.shape[1] - pos, names.index(lookup), target])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


class MentionProbe(nn.Module):
    """One linear head per lookup on the LLM's hidden states after a chosen layer.

    layer: the hidden state (0 = embeddings) every lookup reads, except "holds", which reads
    ``relation_layer``: whether "left of" holds combines the relation word with the placements
    that are themselves looked up at ``layer``, so it is given a layer more.
    """

    def __init__(self, hidden: int, grid: int, layer: int = 2, relation_layer: int = 3):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in lookup_sizes(grid).items()})
        self.layers = {name: relation_layer if name == "holds" else layer for name in self.heads}

    def loss(self, hidden_states: tuple[torch.Tensor, ...], targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy of every lookup, and each lookup's own mean (the log shows which
        ones train). hidden_states: the LLM's ``(B, L, d)`` states per layer
        (``output_hidden_states``); targets: ``(R, 4)`` from :func:`batch_targets` (positions
        from the end of ``L``)."""
        names = list(self.heads)
        total, count, per_lookup = hidden_states[0].new_zeros(()), 0, {}
        for k, name in enumerate(names):
            rows = targets[targets[:, 2] == k]
            if len(rows):
                hidden = hidden_states[self.layers[name]]
                states = hidden[rows[:, 0], hidden.shape[1] - rows[:, 1]]
                summed = F.cross_entropy(self.heads[name](states), rows[:, 3], reduction="sum")
                per_lookup[name] = float(summed.detach()) / len(rows)
                total = total + summed
                count += len(rows)
        return total / max(1, count), per_lookup
