"""Where the visual tokens of a Qwen-VL batch sit, and what the model receives after the kept tokens are chosen."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.ops import trues_first


@dataclass(frozen=True)
class VisualRun:
    """One placeholder run: ``count`` columns from ``start`` (in the padded row), holding the tokens
    ``offset .. offset + count`` of visual unit ``unit`` (an image or a video, numbered in prompt order
    over the batch). A unit is one run, except a Qwen3-VL video: one run per temporal patch (frame pair),
    with its timestamp text between them."""

    start: int
    count: int
    unit: int
    offset: int = 0


@dataclass
class QwenLayout:
    """Where things sit in a batch of prompts.

    runs: per row, its placeholder runs in prompt order (a row may have none).
    question_mask: ``(B, L)`` True on real tokens after the row's last visual run.
    kinds: per visual unit (prompt order over the batch) ``"image"`` or ``"video"``; the ``i``-th image
    unit is row ``i`` of ``image_grid_thw``, the ``j``-th video unit row ``j`` of ``video_grid_thw``.
    real_spans: per row, its runs of real (not padding) columns as ``(start, end)``.
    """

    runs: list[list[VisualRun]]
    question_mask: torch.Tensor
    kinds: list[str]
    real_spans: list[list[tuple[int, int]]]

    @property
    def lengths(self) -> list[int]:
        """Per row, how many of its columns are real."""
        return [sum(end - start for start, end in row) for row in self.real_spans]

    def real_before(self, row: int, column: int) -> int:
        """How many real columns row ``row`` has before ``column``."""
        return sum(min(end, column) - start for start, end in self.real_spans[row] if start < column)

    @property
    def units(self) -> list[list[int]]:
        """Per row, its visual units in prompt order."""
        return [list(dict.fromkeys(r.unit for r in row)) for row in self.runs]

    def of_kind(self, kind: str) -> list[int]:
        """The units of ``kind`` (``"image"`` or ``"video"``), in their grid order."""
        return [u for u, k in enumerate(self.kinds) if k == kind]


@dataclass
class QwenInputs:
    """What the model receives: ``input_ids``, ``attention_mask`` ``(B, L')``, ``position_ids``
    ``(4, B, L')`` (text row over t/h/w), ``image_features`` the tower output of every visual unit in
    unit order (``kinds``: ``"image"`` or ``"video"`` each), whose ``pooler_output`` holds one ``(M_u, d)``
    per unit (Qwen3: ``deepstack_features`` one such tuple per level), ``M_u`` = tokens kept of unit ``u``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_features: object
    kinds: list[str]

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "mm_encoder_outputs": by_kind(self.image_features, self.kinds)}


def by_kind(features, kinds: list[str]) -> dict:
    """``features`` (in unit order, as from :func:`encode_units`) as the model's ``mm_encoder_outputs``:
    ``{"image": ..., "video": ...}``, each in its grid order, a kind only where the batch has it."""
    out = {}
    if features is None:  # a batch of text only
        return out
    levels = getattr(features, "deepstack_features", None)
    for kind in ("image", "video"):
        units = [u for u, k in enumerate(kinds) if k == kind]
        if not units:
            continue
        fields = {"pooler_output": tuple(features.pooler_output[u] for u in units)}
        if levels is not None:
            fields["deepstack_features"] = [tuple(level[u] for u in units) for level in levels]
        out[kind] = type(features)(**fields)
    return out


def _spans(is_kind: torch.Tensor) -> list[list[list[tuple[int, int]]]]:
    """Per kind and row of ``is_kind`` ``(K, B, L)`` bool, its runs of True as ``(start, end)``. One read of
    values for the whole batch (a wait for the device on a GPU), not one per row."""
    zeros = is_kind.new_zeros(*is_kind.shape[:2], 1).int()
    edges = torch.diff(is_kind.int(), dim=2, prepend=zeros, append=zeros)  # (K, B, L + 1): 1 at a start, -1 at an end
    found = edges.nonzero().tolist()  # [kind, row, column] in order: each run's start, then its end
    spans = [[[] for _ in range(is_kind.shape[1])] for _ in range(is_kind.shape[0])]
    for (kind, row, start), (_, _, end) in zip(found[::2], found[1::2]):
        spans[kind][row].append((start, end))
    return spans


def find_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                video_token_id: int | None = None, frame_runs: list[int] | None = None) -> QwenLayout:
    """The placeholder runs (of ``image_token_id`` and ``video_token_id``), visual units and question
    tokens of each row of ``input_ids`` ``(B, L)``. frame_runs: per video (``video_grid_thw`` order)
    how many runs it spans (Qwen3-VL: its temporal patches; else 1); None: every video run is a video."""
    real = attention_mask.bool()
    kinds = [input_ids == image_token_id] + ([] if video_token_id is None else [input_ids == video_token_id])
    real_spans, images, *videos = _spans(torch.cat([real[None], torch.stack(kinds) & real]))
    videos = videos[0] if videos else [[]] * len(images)
    runs, kinds, left = [], [], 0  # left: runs still to come of the open video
    question = real.clone()
    for b in range(input_ids.shape[0]):
        row = []
        for start, end, kind in sorted([(*s, "image") for s in images[b]] + [(*s, "video") for s in videos[b]]):
            if kind == "video" and left > 0:  # the next frame run of the open video
                last = row[-1]
                row.append(VisualRun(start, end - start, last.unit, last.offset + last.count))
                left -= 1
                continue
            if kind == "video":
                video = kinds.count("video")
                left = (frame_runs[video] if frame_runs is not None and video < len(frame_runs) else 1) - 1
            row.append(VisualRun(start, end - start, len(kinds)))
            kinds.append(kind)
        runs.append(row)
        left = 0  # a video never spans rows
        if row:
            question[b, : row[-1].start + row[-1].count] = False
    return QwenLayout(runs, question, kinds, real_spans)


def shrunk_layout(layout: QwenLayout, kept: list[list[int]] | None = None) -> QwenLayout:
    """The layout of the batch :func:`.qwen_positions.keep_columns` gives: each row keeps its real columns, of
    its run ``i`` only ``kept[b][i]`` columns (None: all), and is re-padded on the left. Found on the host from
    ``layout``, with no read of values (finding it in the shrunk batch reads them). A run none of whose columns
    stay is left out (nothing marks it in the shrunk batch); a run's ``offset`` counts its unit's staying tokens."""
    kept = [[run.count for run in row] for row in layout.runs] if kept is None else kept
    lengths = [n - sum(run.count for run in row) + sum(counts)
               for n, row, counts in zip(layout.lengths, layout.runs, kept)]
    width, device = max(lengths, default=0), layout.question_mask.device
    runs, ends, before = [], [], {}  # before: per unit, its tokens staying in earlier runs
    for b, (row, counts, length) in enumerate(zip(layout.runs, kept, lengths)):
        pad, dropped, shrunk = width - length, 0, []
        for run, count in zip(row, counts):
            if count:
                start = pad + layout.real_before(b, run.start) - dropped
                shrunk.append(VisualRun(start, count, run.unit, before.get(run.unit, 0)))
            before[run.unit] = before.get(run.unit, 0) + count
            dropped += run.count - count
        runs.append(shrunk)
        ends.append(shrunk[-1].start + shrunk[-1].count if shrunk else width - length)
    columns = torch.arange(width, device=device)
    question = columns >= torch.tensor(ends, device=device)[:, None]  # (B, L') the real columns after the last run
    real = [[(width - length, width)] if length else [] for length in lengths]
    return QwenLayout(runs, question, layout.kinds, real)


def question_columns(layout: QwenLayout, exclude: torch.Tensor | None = None) -> tuple[list[torch.Tensor], int]:
    """``(columns, tail)`` of a left-padded batch: per row its question columns ``(T_b,)`` (increasing), and
    how many columns run from the earliest first question column of any row to the end. exclude: optional
    ``(B, L)`` columns that are not question (a teacher-forced sequence's answers).

    Left-padded, a row's question is every column after its last run, which the layout knows on the host;
    only rows without a run, or answers to leave out, need one read of the mask for the whole batch."""
    length, device = layout.question_mask.shape[1], layout.question_mask.device
    if exclude is None and all(layout.runs):
        ends = [row[-1].start + row[-1].count for row in layout.runs]
        return [torch.arange(end, length, device=device) for end in ends], length - min(ends)
    question = layout.question_mask if exclude is None else layout.question_mask & ~exclude
    order = trues_first(question)  # (B, L) each row's question columns first
    counts, starts = torch.stack([question.sum(1), order[:, 0]]).tolist()
    tail = max((length - start for start, count in zip(starts, counts) if count), default=0)
    return [columns[:count] for columns, count in zip(order, counts)], tail
