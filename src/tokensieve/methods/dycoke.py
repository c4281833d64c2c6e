"""DyCoke, stage 1 (TTM): thin a video's frames against an earlier frame, keeping the tokens that changed.

As released (KD-TAO/DyCoke@dd74634, ``llava/model/llava_arch.py`` ``dycole_ttm``, run on LLaVA-OneVision's
pooled video tokens, ``F`` frames of ``P = 196``, before the LLM and its one trailing newline):

* pass 1, frame pairs ``(0, 1), (2, 3), ...``: the first frame stays whole, the second keeps its
  ``int((1 - k) * P)`` tokens least similar to the first, by cosine similarity of the two frames' tokens
  at the same grid cell (computed on L2-normalised tokens);
* pass 2, ``i in range(0, F - 4, 4)``: frame ``i + 2`` (whole after pass 1) keeps its ``int((1 - k) * P)``
  tokens least similar to frame ``i``'s, cosine on the raw tokens. With ``F`` a multiple of 4 the last
  group's frame ``F - 2`` stays whole (32 frames: 9 whole, 23 cut);
* the frames are concatenated in order, a cut frame's tokens by rising similarity (``topk``'s order).

``k = 0.3`` by default (``load_pretrained_model``'s ``dycoke_k``): 32 x 196 -> 4,915 tokens. The
released code drops an odd video's last frame (pass 1's ``range(0, F - 1, 2)`` never reaches it) and fails
below 5 frames (pass 2 stacks an empty list); here an odd or shorter video is refused in one line.

The budget: a count or ratio of the video's tokens, kept exactly. The frames DyCoke keeps whole stay whole;
the rest of the budget is shared by the cut frames: ``R // G`` each, and one more for the first ``R % G``
in frame order (ours: the reference's frames all keep the same count). A budget of
:func:`dycoke_count` ``(F, P, k)`` is the reference's, token for token. Stage 2 (re-selecting the KV cache
at every decoding step) is not a prefill-time choice and is not here (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, VisualUnit, register

ORDERS = ("similarity", "positions")


def cut_frames(frames: int) -> list[tuple[int, int, bool]]:
    """The frames the reference cuts, in frame order: ``(frame, anchor frame it is compared with,
    normalised first)`` (pass 1: ``(2j + 1, 2j, True)``; pass 2: ``(i + 2, i, False)``)."""
    pass1 = [(f + 1, f, True) for f in range(0, frames - 1, 2)]
    pass2 = [(i + 2, i, False) for i in range(0, frames - 4, 4)]
    return sorted(pass1 + pass2)


def dycoke_count(frames: int, per_frame: int, k: float = 0.3) -> int:
    """The tokens the reference keeps of an even video of ``frames x per_frame`` tokens at its ``k``
    (``dycoke_k``): the whole frames, and ``int((1 - k) * per_frame)`` of each cut one."""
    cut = len(cut_frames(frames))
    return (frames - cut) * per_frame + cut * int((1 - k) * per_frame)


def ttm_keep(frames: torch.Tensor, keep: int, where: str = "llm.0") -> torch.Tensor:
    """The ``keep`` tokens DyCoke's TTM keeps of one video, in the reference's output order.

    frames: ``(F, P, d)`` the video's tokens, frame-major (``F`` even, at least 6); returns ``(keep,)``
    indices into the ``F * P`` tokens: frame by frame, a whole frame's in grid order, a cut frame's by
    rising similarity to its anchor frame. Similarities in the tokens' dtype, as the reference.
    """
    n_frames, per_frame, _ = frames.shape
    cut = cut_frames(n_frames)
    whole = (n_frames - len(cut)) * per_frame
    if keep < whole:
        raise TokensieveError(f"dycoke at {where}: a budget of {keep} tokens is below the {whole} of the "
                              f"{n_frames - len(cut)} frames it keeps whole of this {n_frames} x {per_frame} video "
                              f"(its default k=0.3 keeps {dycoke_count(n_frames, per_frame)})")
    # The cut frames share what the whole ones leave: equal quotas (the reference's), the remainder
    # one each to the first ones (ours, for a budget that is no reference count).
    share, extra = divmod(keep - whole, len(cut))
    cuts = {}
    for j, (frame, anchor, normalised) in enumerate(cut):
        a, b = frames[anchor], frames[frame]
        if normalised:  # pass 1 normalises first, pass 2 does not: the same cosine up to rounding
            a, b = F.normalize(a, p=2, dim=1), F.normalize(b, p=2, dim=1)
        similarity = F.cosine_similarity(a, b, dim=1)  # (P,)
        cuts[frame] = similarity.topk(share + (j < extra), largest=False).indices  # least similar first
    grid = torch.arange(per_frame, device=frames.device)
    return torch.cat([frame * per_frame + cuts.get(frame, grid) for frame in range(n_frames)])


def video_of(units: list[VisualUnit] | None, n: int, where: str) -> VisualUnit:
    """The one video a row of ``n`` tokens holds, every cell of it (refused otherwise, in one line)."""
    if units is None:
        raise TokensieveError(f"dycoke at {where}: no frames here (SiteInputs.units); DyCoke prunes a video's "
                              "frames before the LLM (llm.0)")
    if len(units) != 1:
        raise TokensieveError(f"dycoke at {where}: a row of {len(units)} images or videos; DyCoke chooses in one "
                              "video at a time (llm.0)")
    (unit,) = units
    if unit.kind != "video":
        raise TokensieveError(f"dycoke at {where}: an image; DyCoke prunes videos only (it compares each frame "
                              "with an earlier one)")
    if len(unit.cells) != n or unit.frames * unit.rows * unit.cols != n:
        raise TokensieveError(f"dycoke at {where}: {n} of the video's {unit.frames * unit.rows * unit.cols} tokens "
                              "are here; DyCoke needs every token of every frame")
    frames = unit.frames
    if frames % 2 or frames < 6:
        why = ("the released code drops an odd video's last frame" if frames % 2 else
               "below 5 frames the released code fails, and an odd count loses its last frame")
        raise TokensieveError(f"dycoke at {where}: a video of {frames} frames (temporal patches on Qwen-VL); "
                              f"DyCoke needs an even count of at least 6 ({why})")
    return unit


@register
@dataclass
class DyCoke(Method):
    """DyCoke's temporal token merging (TTM, stage 1): per video, the frames it keeps whole, and of the
    others the tokens least similar to an earlier frame's at the same grid cell.

    The budget is exact: what the whole frames leave of it is shared by the cut frames (module
    docstring); :func:`dycoke_count` gives the reference's count at its ``k``. order: ``"similarity"`` (the
    reference's: a cut frame's tokens enter the LLM by rising similarity) or ``"positions"`` (ours: every
    frame's kept tokens in grid order; what a backbone that keeps grid positions, Qwen-VL, needs).
    """

    order: str = "similarity"

    name = "dycoke"
    paper = ("Tao, Qin, You, Sui, Wang. DyCoke: Dynamic Compression of Tokens for Fast Video Large Language "
             "Models. CVPR 2025. arXiv:2411.15024")
    stages = ("llm",)
    default_site = "llm.0"
    handles_video = True
    needs_video = True
    signals = ()

    def __post_init__(self):
        if self.order not in ORDERS:
            raise TokensieveError(f"dycoke: order must be one of {', '.join(ORDERS)}, got {self.order!r}")

    @property
    def own_order(self) -> str | None:
        """What the LLM receives in an order of the method's own, or None for grid order."""
        return "each cut frame's tokens by rising similarity" if self.order == "similarity" else None

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if site != "llm.0":
            raise TokensieveError(f"dycoke acts on a video's frame tokens before the LLM (llm.0), not {site}")

    def select(self, inputs: SiteInputs) -> Selection:
        b, n, d = inputs.tokens.shape
        units = inputs.units or [None] * b
        emitted = []
        for row in range(b):
            unit = video_of(units[row], n, inputs.site)
            frames = inputs.tokens[row].reshape(unit.frames, unit.rows * unit.cols, d)
            emitted.append(ttm_keep(frames, inputs.keep, inputs.site))
        emitted = torch.stack(emitted)  # (B, K)
        indices, rank = emitted.sort(1)
        return Selection(indices, order=rank.argsort(1) if self.order == "similarity" else None)
