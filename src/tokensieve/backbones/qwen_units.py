"""The visual units of a Qwen-VL batch - its images and videos, in prompt order over the batch -: their
grids, their placeholder runs checked against them, one tower output in unit order, and that output
handed back to the model by kind.

An image with patch grid ``1 x h x w`` gives ``h/2 x w/2`` merged tokens; a video of ``F`` frames has
``t = F/2`` temporal patches (``temporal_patch_size`` 2 frames each, its ``video_grid_thw`` row
``t x h x w``) and gives ``t x h/2 x w/2`` tokens, frame-major then row-major. Qwen2-VL and Qwen2.5-VL
give a video one placeholder run; Qwen3-VL one run per temporal patch, with its timestamp text
(``<0.5 seconds>``) between them (its processor's ``replace_video_token``; its ``get_rope_index`` splits
the video grid alike). The model encodes images and videos in one tower pass each; so does the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokensieve.backbones.qwen_layout import QwenLayout
from tokensieve.errors import TokensieveError
from tokensieve.method import VisualUnit, registered


def frame_runs(video_grid_thw: torch.Tensor | None, per_frame: bool) -> list[int] | None:
    """Per video, how many placeholder runs it spans: its temporal patches where the family gives each
    its own run (``per_frame``: Qwen3-VL), else 1."""
    if video_grid_thw is None:
        return None
    return video_grid_thw[:, 0].tolist() if per_frame else [1] * len(video_grid_thw)


def unit_grids(layout: QwenLayout, image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
               merge: int) -> list[tuple[int, int, int]]:
    """Per unit, its ``(frames, rows, cols)`` of merged tokens (an image: one frame; a video: its temporal
    patches); the grids' rows ``(n, 3)`` are ``(t, h, w)`` in patches, ``merge`` the patch merger's side."""
    rows = {"image": iter([] if image_grid_thw is None else image_grid_thw.tolist()),
            "video": iter([] if video_grid_thw is None else video_grid_thw.tolist())}
    return [(t, h // merge, w // merge) for t, h, w in (next(rows[kind]) for kind in layout.kinds)]


def checked_counts(layout: QwenLayout, image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                   merge: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """``(counts, grids)``: the token count of each unit and its :func:`unit_grids` grid, refused unless the
    prompts hold one unit per grid row and each unit's placeholder runs hold its grid's tokens (a Qwen3-VL
    video: each run one temporal patch's)."""
    for kind, grid in (("image", image_grid_thw), ("video", video_grid_thw)):
        have, given = len(layout.of_kind(kind)), 0 if grid is None else len(grid)
        if have != given:
            held = {"image": "image placeholder runs", "video": "videos"}[kind]
            raise TokensieveError(f"the prompts hold {have} {held} for {given} {kind}s ({kind}_grid_thw rows)")
    grids = unit_grids(layout, image_grid_thw, video_grid_thw, merge)
    counts = [t * h * w for t, h, w in grids]
    held = [0] * len(counts)
    for row in layout.runs:
        for run in row:
            held[run.unit] += run.count
    for u, (kind, (t, h, w)) in enumerate(zip(layout.kinds, grids)):
        runs = [r for row in layout.runs for r in row if r.unit == u]
        per_frame = kind == "video" and len(runs) > 1
        if held[u] != counts[u] or (per_frame and any(r.count != h * w for r in runs)):
            index = layout.of_kind(kind).index(u)
            shape = "x".join(map(str, (t, h * merge, w * merge)))
            what = "placeholder run has" if len(runs) == 1 else f"{len(runs)} placeholder runs have"
            raise TokensieveError(f"{kind} {index}: its {what} {held[u]} tokens, its {shape} patch grid gives "
                                  f"{counts[u]}" + (f" ({h * w} per frame run)" if per_frame else ""))
    return counts, grids


def encode_units(model, kinds: list[str], pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
                 pixel_values_videos: torch.Tensor | None, video_grid_thw: torch.Tensor | None):
    """The tower's output of every unit, in unit order: one pass over the images (``get_image_features``)
    and one over the videos (``get_video_features``), as the model runs them; ``model`` a ``Qwen*VLModel``.
    Its ``pooler_output`` holds one ``(N_u, d)`` per unit (Qwen3: ``deepstack_features`` one such tuple
    per level); None without units."""
    if not kinds:
        return None  # a batch of text only
    outputs = {}
    if "image" in kinds:
        outputs["image"] = model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    if "video" in kinds:
        outputs["video"] = model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
    return _in_order(outputs, kinds)


def in_unit_order(parts: dict[str, Sequence], kinds: list[str]) -> list:
    """``{"image": [...], "video": [...]}`` (one entry per unit of the kind, in its grid order) as one list
    in unit order."""
    place = {kind: iter(items) for kind, items in parts.items()}
    return [next(place[kind]) for kind in kinds]


def _in_order(outputs: dict, kinds: list[str]):
    """``{"image": output, "video": output}`` (each in its grid order) as one output in unit order."""
    first = next(iter(outputs.values()))
    fields = {"pooler_output": tuple(in_unit_order({k: o.pooler_output for k, o in outputs.items()}, kinds))}
    if getattr(first, "deepstack_features", None) is not None:
        fields["deepstack_features"] = [
            tuple(in_unit_order({k: o.deepstack_features[j] for k, o in outputs.items()}, kinds))
            for j in range(len(first.deepstack_features))]
    return type(first)(**fields)


def merger_inputs(backbone, captured: list[torch.Tensor], tower_grids: list[torch.Tensor],
                  kinds: list[str]) -> list[torch.Tensor]:
    """Per unit (unit order), the patch merger's input behind each of its ``N_u`` tokens:
    ``(N_u, merge**2 * d_v)``, the ``merge x merge`` patches of a token side by side, in the order of the
    merger's output (Qwen2.5's window order undone). captured: the merger's packed input ``(S, d_v)`` of
    each tower pass (images, then videos), whose ``(n, 3)`` grids are ``tower_grids``."""
    parts = {}
    for kind, x, grid in zip([k for k in ("image", "video") if k in kinds], captured, tower_grids):
        tokens = x.reshape(-1, backbone.merge_unit * x.shape[-1])
        order = backbone.merger_output_order(grid)
        if order is not None:
            tokens = tokens[order.to(tokens.device)]
        parts[kind] = list(tokens.split(backbone.image_token_counts(grid)))
    return in_unit_order(parts, kinds)


def refuse_video(st, units: list[VisualUnit], where: str) -> None:
    """One line when ``units`` hold a video and stage ``st``'s method does not declare ``handles_video``."""
    if st.method.handles_video or all(unit.kind != "video" for unit in units):
        return
    able = ", ".join(sorted(name for name, cls in registered().items() if cls.handles_video))
    raise TokensieveError(f"{st}: {where} holds a video, which {st.method.name} cannot take (it does not declare "
                          f"handles_video: its rule may assume one image grid); methods that can: {able}")


def visual_units(layout: QwenLayout, grids: list[tuple[int, int, int]], device=None) -> list[list[VisualUnit]]:
    """Per row, its units as methods see them (:class:`~tokensieve.method.VisualUnit`), every token there:
    each unit's ``start`` among the row's visual tokens (its units in prompt order) and all its cells."""
    rows = []
    for units in layout.units:
        row, start = [], 0
        for u in units:
            frames, height, width = grids[u]
            n = frames * height * width
            row.append(VisualUnit(layout.kinds[u], frames, height, width, start, torch.arange(n, device=device)))
            start += n
        rows.append(row)
    return rows


def units_now(rows: list[list[VisualUnit]], origins: list[torch.Tensor], made: bool = False) -> list[list[VisualUnit]]:
    """Each row's ``units`` (every token there, :func:`visual_units`) as they are after earlier stages:
    origins: per row ``(n,)`` each remaining token's index among the row's visual tokens before pruning,
    unit after unit (increasing, except within a unit whose method gave an order of its own), then
    ``EXTRA`` (negative) for any tokens a method made; made: whether an earlier stage made any. A unit
    none of whose tokens remain is left out.

    A row of one unit holds all its remaining tokens, known on the host unless tokens were made; the
    other rows are counted in one read of values for the whole batch, not a boolean mask per unit."""
    counted = [len(units) > 1 or (made and bool(units)) for units in rows]
    before = []  # per counted row, (2 * units,): its remaining tokens before each unit's first and past its last
    for units, origin, count in zip(rows, origins, counted):
        if count:
            edges = torch.tensor([[u.start, u.start + len(u.cells)] for u in units], device=origin.device)
            before.append(((origin >= 0) & (origin < edges.view(-1, 1))).sum(1))
    counts = iter(torch.cat(before).tolist() if before else [])
    out = []
    for units, origin, count in zip(rows, origins, counted):
        row, start = [], 0
        for unit in units:
            first, end = (next(counts), next(counts)) if count else (0, len(origin))
            if end > first:
                cells = origin[first:end] - unit.start
                row.append(VisualUnit(unit.kind, unit.frames, unit.rows, unit.cols, start, cells))
                start += end - first
        out.append(row)
    return out
