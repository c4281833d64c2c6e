"""VisionZip: keep the tokens CLS attends to most, merge the rest into a few contextual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.methods.tower_importance import importance_signals
from tokensieve.ops import complement, cosine_matrix, gather_tokens, merge_into

CLS_CHOICES = ("emit", "drop")
MERGE_CHOICES = ("add", "mean")
ORDER_CHOICES = ("blocks", "positions")


def visionzip_split(keep: int, dominant_ratio: float) -> tuple[int, int]:
    """``(dominant, contextual)`` counts for a budget of ``keep`` tokens.

    ``round(dominant_ratio * keep)`` dominant tokens, the rest contextual; with the default
    54/64 this gives the released 54+10 (64), 108+20 (128) and 162+30 (192). The dominant count
    includes the CLS token when it is emitted (see :class:`VisionZip`).
    """
    dominant = min(keep, max(0, round(dominant_ratio * keep)))
    return dominant, keep - dominant


def visionzip_reduce(tokens: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int, merge: str = "add") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dominant tokens by CLS attention plus contextual tokens merged by key similarity.

    tokens: ``(B, N, d)``; cls_attention: ``(B, N)``; keys: ``(B, N, d_k)``.
    dominant: how many tokens are kept by highest CLS attention (unchanged).
    contextual: how many of the remaining ``R = N - dominant`` tokens (taken in index order)
        serve as targets: those at positions ``0, s, 2s, ...`` of the remaining ones with step
        ``s = max(1, R // contextual)``. Every other remaining token is assigned to the target
        whose key is most cosine-similar (the first such target on a tie).
    merge: ``"add"`` (the released formula): a target becomes itself plus the mean of the
        tokens assigned to it (itself if none); ``"mean"``: the plain mean of the target and the
        tokens assigned to it.
    Returns ``(dominant_indices (B, dominant), target_indices (B, contextual), contextual_tokens
    (B, contextual, d))``, both index sets ascending, the contextual tokens aligned with the targets.
    """
    b, n, d = tokens.shape
    dom = cls_attention.topk(dominant, dim=1).indices.sort(1).values  # (B, dominant)
    rest = complement(dom, n)  # (B, R) in index order
    r = rest.shape[1]
    if contextual == 0:
        return dom, rest[:, :0], tokens.new_zeros(b, 0, d)
    step = max(1, r // contextual)
    slots = torch.arange(0, r, step, device=tokens.device)[:contextual]
    c = len(range(0, r, step)[:contextual])
    is_other = torch.ones(r, dtype=torch.uint8, device=tokens.device).index_fill_(0, slots, 0)
    # Targets, then the others, each in index order (a stable sort; a boolean mask would wait for the device).
    order = is_other.argsort(stable=True)
    targets, others = rest.index_select(1, order[:c]), rest.index_select(1, order[c:])  # (B, C), (B, R - C)
    similarity = cosine_matrix(gather_tokens(keys.float(), others), gather_tokens(keys.float(), targets))
    assign = similarity.argmax(-1)  # (B, R - C) index into the targets; argmax keeps the first maximum
    target_x, other_x = gather_tokens(tokens, targets).float(), gather_tokens(tokens, others).float()
    if merge == "mean":
        merged = merge_into(target_x, other_x, assign)
    else:
        total = torch.zeros_like(target_x).scatter_add_(1, assign[..., None].expand_as(other_x), other_x)
        count = torch.zeros(target_x.shape[:2], device=tokens.device).scatter_add_(
            1, assign, torch.ones(assign.shape, device=tokens.device))
        merged = target_x + total / count.clamp_min(1)[..., None]
    return dom, targets, merged.to(tokens.dtype)


@register
@dataclass
class VisionZip(Method):
    """VisionZip: dominant tokens by CLS attention, contextual tokens by merging the rest.

    By default this is the released LLaVA code (``dvlab-research/VisionZip``,
    ``CLIPVisionTower_VisionZip.forward``): ``round(dominant_ratio * keep)`` dominant tokens,
    counting the CLS token, which is emitted first (the ``cls_token`` signal ``(B, d)``, the
    tower's CLS at the feature layer) when the site offers it; the others are the patches of
    highest ``cls_attention`` ``(B, N)`` (the feature block's CLS row; the released code sums
    the heads, we average them: same ranking). The ``keep - dominant`` contextual tokens come
    from the remaining patches: evenly spaced targets in index order, every other remaining
    patch assigned to the target of most cosine-similar ``keys`` ``(B, N, d_k)`` (the block's
    keys averaged over heads), and each target becomes ``target + mean(assigned)``. Emitted
    order: CLS, dominant patches by index, then contextual tokens by index. Budget 64 is
    CLS + 53 + 10. Acts on the vision tower's output (default site ``projector``), or before a
    vision block, where CLS is the tower's own prefix token: no CLS is emitted there and every
    dominant token is a patch, in place.

    Options that are ours, off by default: ``cls="drop"`` never emits CLS (every dominant
    token is a patch); ``merge="mean"`` makes a contextual token the plain mean of its target
    and the tokens assigned to it; ``order="positions"`` keeps every kept token in its
    original position instead of dominant-then-contextual.
    Decisions are per row, as in the released code.

    Towers without CLS (Qwen-VL): ``importance="received_attention", cls="drop", order="positions"``
    is the authors' own Qwen2.5-VL port (JIA-Lab-research/VisionZip ``Qwen2_5_VL/qwen2_5vl_visionzip.py``,
    commit 68993a31): dominant tokens by the attention each merged token receives in the tower's last
    block, ``keys`` that block's rotated keys per merged token, merging on the merger's output, every
    kept token (contextual ones at their target's place) in its image position
    (tests/test_parity_visionzip_qwen.py). Its 70% setting, 65% dominant + 5% contextual tokens, is a
    budget of ``int(0.65 N) + max(int(0.05 N), 1)`` with ``dominant_ratio`` = 65/70 (up to rounding).
    """

    name = "visionzip"
    paper = ("Yang, Chen, Tian, Wang, Yang, Yu, Jia. VisionZip: Longer is Better but Not Necessary "
             "in Vision Language Models. CVPR 2025. arXiv:2412.04467")
    stages = ("vision", "projector")
    default_site = "projector"
    signals = ("cls_attention", "keys")
    optional_signals = ("cls_token",)
    # its authors' variant for a tower without CLS (their Qwen2.5-VL port)
    no_cls_options = {"importance": "received_attention", "cls": "drop", "order": "positions"}
    no_cls_source = "the authors' Qwen2.5-VL port"

    dominant_ratio: float = 54 / 64
    cls: str = "emit"
    merge: str = "add"
    order: str = "blocks"
    importance: str = "cls_attention"

    def __post_init__(self):
        ratio = self.dominant_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise TokensieveError(f"visionzip: dominant_ratio {ratio!r} is not a number in [0, 1]")
        for option, value, choices in (("cls", self.cls, CLS_CHOICES), ("merge", self.merge, MERGE_CHOICES),
                                       ("order", self.order, ORDER_CHOICES)):
            if value not in choices:
                raise TokensieveError(f"visionzip: {option} {value!r} is not one of {', '.join(choices)}")
        self.signals = importance_signals(self.name, self.importance, type(self).signals)

    @property
    def makes_extra_tokens(self) -> bool:
        """True when CLS may be emitted as a token of its own (``cls="emit"``)."""
        return self.cls == "emit"

    def select(self, inputs: SiteInputs) -> Selection:
        att, keys = inputs.signal(self.importance), inputs.signal("keys")
        dominant, contextual = visionzip_split(inputs.keep, self.dominant_ratio)
        cls = inputs.signal("cls_token") if self.cls == "emit" and "cls_token" in inputs.signals else None
        if cls is not None:  # CLS is one of the dominant tokens, so one patch fewer
            dominant = max(dominant, 1)
            contextual = inputs.keep - dominant
            dominant -= 1
        dom, targets, merged = visionzip_reduce(inputs.tokens, att, keys, dominant, contextual, self.merge)
        extra = None if cls is None else cls[:, None, :].to(inputs.tokens.dtype)
        if contextual == 0:
            return Selection(dom, extra=extra, extra_first=True)
        indices, slot = torch.cat([dom, targets], 1).sort(1)
        contents = gather_tokens(torch.cat([gather_tokens(inputs.tokens, dom), merged], 1), slot)
        # emitted dominant block then contextual block; in a vision block tokens stay in place
        blocks = self.order == "blocks" and not inputs.site.startswith("vision")
        return Selection(indices, contents, extra=extra, extra_first=True, order=slot.argsort(1) if blocks else None)
