"""ToMe: merge tokens by bipartite soft matching inside the ViT's blocks instead of dropping them.

Reference: facebookresearch/ToMe at af95e4b1befa172dadccd8c81e223b10090f9579 (``tome/merge.py``
``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``; ``tome/patch/timm.py`` ``ToMeBlock``,
``ToMeAttention``; ``tome/utils.py`` ``parse_r``). By default this is the released mechanism:

* in every block from the stage's site on, between the attention and the MLP, ``r`` tokens are
  merged (at most half of the mergeable ones); the MLP and every later block run on the rest;
* the similarity is the cosine of that block's attention keys, averaged over heads;
* set A is the even positions, B the odd ones, of the current sequence, the CLS token (index 0,
  in A) never merges; each A token's best B partner is found, the ``r`` best-matched A tokens
  merge into their partners by size-weighted mean, and the sequence becomes
  ``[unmerged A (in position order with a CLS token, else by falling score), B]``;
* sizes (original tokens per token) weight the means and, as ``log(size)`` added to the
  attention logits of every later block, the attention (proportional attention).

The hooks that do this live in :mod:`tokensieve.backbones.block_merging`; this module holds the
tensor functions and the schedule. ``one_site=True`` is ours: merge straight down to the budget
at the site itself, in matching rounds, survivors in position order (the pre-issue-23 ToMe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import cosine_matrix, gather_tokens, merge_into


def bipartite_matching(metric: torch.Tensor, r: int, class_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens one ToMe step merges, and where everything goes.

    metric: ``(B, T, c)`` what similarity is measured on (the block's keys, mean over heads).
    r: tokens to remove, capped at half of those that may merge (``(T - class_token) // 2``).
    class_token: token 0 is a CLS token: it never merges and stays first.
    Returns ``(slot (B, T), order (B, T'))`` with ``T' = T - r``: ``slot`` is the output token
    each input token goes to, ``order`` the input token each output slot is (unmerged A tokens,
    then every B token). A tie in the best scores falls as the released code's (unstable)
    descending argsort lets it, so the same torch build gives the same choice.
    """
    b, t, _ = metric.shape
    r = max(0, min(r, (t - int(class_token)) // 2))
    device = metric.device
    if r == 0:
        identity = torch.arange(t, device=device).expand(b, t)
        return identity, identity
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)
        if class_token:
            scores[:, 0, :] = -math.inf
        best, partner = scores.max(dim=-1)  # (B, |A|)
        ranked = best.argsort(dim=-1, descending=True)
        merged, unmerged = ranked[:, :r], ranked[:, r:]
        if class_token:
            unmerged = unmerged.sort(dim=-1).values  # CLS first, the rest in position order
    n_a, n_b = (t + 1) // 2, t // 2
    kept_a = n_a - r
    slot_a = torch.empty(b, n_a, dtype=torch.long, device=device)
    slot_a.scatter_(1, unmerged, torch.arange(kept_a, device=device).expand(b, kept_a))
    slot_a.scatter_(1, merged, kept_a + partner.gather(1, merged))
    slot = torch.empty(b, t, dtype=torch.long, device=device)
    slot[:, ::2] = slot_a
    slot[:, 1::2] = kept_a + torch.arange(n_b, device=device)
    order = torch.cat([2 * unmerged, (2 * torch.arange(n_b, device=device) + 1).expand(b, n_b)], 1)
    return slot, order


def merge_wavg(x: torch.Tensor, size: torch.Tensor, slot: torch.Tensor,
               slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens going to each slot (ToMe's ``merge_wavg``).

    x: ``(B, T, d)``; size: ``(B, T)``; slot: ``(B, T)`` from :func:`bipartite_matching`.
    Returns ``(merged (B, slots, d), sizes (B, slots))``, computed in float32 at least.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight = size.to(dtype)
    total = weight.new_zeros(x.shape[0], slots).scatter_add_(1, slot, weight)
    summed = x.new_zeros(x.shape[0], slots, x.shape[2], dtype=dtype).scatter_add_(
        1, slot[..., None].expand(-1, -1, x.shape[2]), x.to(dtype) * weight[..., None])
    return (summed / total[..., None]).to(x.dtype), total


def parse_r(r: int | list[int], blocks: int) -> list[int]:
    """ToMe's ``r`` as tokens to merge in each of ``blocks`` blocks: a constant, or a per-block
    list padded with zeros (the released ``parse_r`` without its inflection form)."""
    if isinstance(r, int) and not isinstance(r, bool):
        if r < 0:
            raise TokensieveError(f"tome: r={r} must be >= 0")
        return [r] * blocks
    if isinstance(r, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
        if len(r) > blocks:
            raise TokensieveError(f"tome: r lists {len(r)} blocks but the stage merges in {blocks}")
        return list(r) + [0] * (blocks - len(r))
    raise TokensieveError(f"tome: r={r!r} must be a token count per block or a list of them")


def budget_schedule(n: int, keep: int, blocks: int) -> list[int]:
    """Tokens to merge in each of ``blocks`` blocks to bring ``n`` mergeable tokens to ``keep``.

    Ours (ToMe takes ``r``, not a budget): the even split, i.e. ToMe's constant ``r`` for a
    budget of ``n - blocks * r``, else the first blocks one more than the rest. Where the
    released cap (half the tokens of a block) would cut that, the smallest constant ``r`` that
    reaches the budget under the cap, the merges past the budget given back one per block
    from the last merging block backwards (early blocks merge more). The list never increases.
    """
    if blocks < 1:
        raise TokensieveError("tome: no block to merge in")
    if not 1 <= keep <= n:
        raise TokensieveError(f"tome: cannot keep {keep} of {n} tokens")
    if keep * 2 ** blocks < n:  # halving in every block is the most ToMe merges
        raise TokensieveError(f"tome: {blocks} block{'s' if blocks > 1 else ''} merging at most half of the tokens "
                              f"each cannot bring {n} tokens down to {keep}; keep more or merge in more blocks")
    q, rem = divmod(n - keep, blocks)
    even = [q + 1] * rem + [q] * (blocks - rem)
    if schedule_leaves(n, even)[-1] == keep:
        return even
    r = q + 1
    while schedule_leaves(n, [r] * blocks)[-1] > keep:
        r += 1
    *schedule, left = schedule_leaves(n, [r] * blocks)
    excess = keep - left
    while excess:  # one merge back from each of the last blocks still merging, in turn
        merging = [i for i in range(blocks) if schedule[i] > 0][-excess:]
        for i in merging:
            schedule[i] -= 1
        excess -= len(merging)
    return schedule


def schedule_leaves(n: int, schedule: list[int]) -> list[int]:
    """The schedule as ToMe applies it (each ``r`` capped at half the mergeable tokens), and
    the tokens left; returns ``[r_0, ..., r_last, tokens left]``."""
    applied = []
    for r in schedule:
        r = min(r, n // 2)
        applied.append(r)
        n -= r
    return applied + [n]


def _matching_round(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, pos: torch.Tensor,
                    r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of the one-site merge: ``r <= |A|`` tokens of every row merged.

    x: ``(B, n, d)`` contents; metric: ``(B, n, m)``; size: ``(B, n)``; pos: ``(B, n)``
    original indices, ascending. Returns the same four for the ``n - r`` survivors, ascending by ``pos``.
    """
    xa, xb = x[:, ::2], x[:, 1::2]
    ma, mb = metric[:, ::2], metric[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    pa, pb = pos[:, ::2], pos[:, 1::2]

    best, match = cosine_matrix(ma, mb).max(-1)  # (B, |A|): each A token's best B partner
    order = best.argsort(dim=-1, descending=True, stable=True)
    src, unmerged = order[:, :r], order[:, r:].sort(-1).values
    dst = match.gather(1, src)  # (B, r) index into B

    src_size = sa.gather(1, src)
    xb = merge_into(xb, gather_tokens(xa, src), dst, sb, src_size)
    mb = merge_into(mb, gather_tokens(ma, src), dst, sb, src_size)
    sb = sb.scatter_add(1, dst, src_size)

    x = torch.cat([gather_tokens(xa, unmerged), xb], 1)
    metric = torch.cat([gather_tokens(ma, unmerged), mb], 1)
    size = torch.cat([sa.gather(1, unmerged), sb], 1)
    pos = torch.cat([pa.gather(1, unmerged), pb], 1)
    back = pos.argsort(-1)
    return gather_tokens(x, back), gather_tokens(metric, back), size.gather(1, back), pos.gather(1, back)


def tome_merge(tokens: torch.Tensor, keep: int,
               metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours (``one_site=True``): merge each row of ``tokens`` down to ``keep`` tokens at once.

    tokens: ``(B, N, d)``; metric: optional ``(B, N, m)`` features to match on (attention
    keys), defaulting to the tokens. Each round splits the current tokens into A (even
    positions) and B (odd), matches every A token to its most similar B token and merges the
    ``min(|A|, still to merge)`` best-matched A tokens (stable order on ties) into their
    partners by size-weighted mean; rounds repeat until ``N - keep`` merges are done, the
    merged keys being size-weighted means too.
    Returns ``(indices (B, keep), merged (B, keep, d))``: the survivors' original indices in
    ascending order and their merged contents (``tokens`` itself when ``keep == N``).
    """
    b, n, _ = tokens.shape
    if not 1 <= keep <= n:
        raise TokensieveError(f"tome: cannot keep {keep} of {n} tokens")
    pos = torch.arange(n, device=tokens.device).expand(b, n)
    if keep == n:
        return pos.clone(), tokens
    if metric is None:
        metric = tokens
    if metric.shape[:2] != tokens.shape[:2]:
        raise TokensieveError(f"tome: metric of shape {tuple(metric.shape)} does not match tokens "
                              f"of shape {tuple(tokens.shape)}")
    x, metric = tokens.float(), metric.float()
    size = x.new_ones(b, n)
    while x.shape[1] > keep:
        current = x.shape[1]
        r = min(current - keep, (current + 1) // 2)  # |A| = ceil(current / 2)
        x, metric, size, pos = _matching_round(x, metric, size, pos, r)
    return pos, x.to(tokens.dtype)


@register
@dataclass
class ToMe(Method):
    """ToMe (bipartite soft matching) as released: merge ``r`` tokens in every block.

    A stage at ``vision.i`` merges inside blocks ``i, i+1, ...`` up to the end of the tower (or
    the next stage, or the LLaVA feature layer), between attention and MLP, on the block's
    keys averaged over heads, CLS protected, with proportional attention; its budget is what
    is left at that end. Parameters:

    r: ToMe's own ``r``: tokens merged per block (an int, the paper's constant ``r``) or a list
        per block (ToMe's list form, padded with zeros); each capped at half as released. The
        stage's budget must then equal what it leaves. ``None`` (default): the budget sets the
        per-block list (:func:`budget_schedule`; constant ``r`` when it divides evenly).
    prop_attn: proportional attention (``log(size)`` on the attention logits), the released
        default for off-the-shelf models.
    one_site: ours, off by default: merge straight down to the budget at the site itself
        (:func:`tome_merge`), also at the projector; the survivors stay in position order.
    """

    name = "tome"
    paper = ("Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman. Token Merging: Your ViT But Faster. "
             "ICLR 2023. arXiv:2210.09461")
    stages = ("vision", "projector")
    default_site = "vision.0"
    signals = ("keys",)

    r: int | list[int] | None = None
    prop_attn: bool = True
    one_site: bool = False

    def __post_init__(self):
        if self.r is not None:
            self.r = parse_r(self.r, len(self.r)) if isinstance(self.r, (list, tuple)) else parse_r(self.r, 1)[0]
        if self.one_site and self.r is not None:
            raise TokensieveError("tome: r is the per-block schedule of the in-block merge; one_site merges "
                                  "to the budget at one site and takes no r")

    @property
    def merges_in_blocks(self) -> bool:
        """True when the engine must merge inside the vision blocks (:mod:`tokensieve.backbones.
        block_merging`) instead of calling :meth:`select` at the site."""
        return not self.one_site

    def merge_schedule(self, n: int, keep: int, blocks: int) -> list[int]:
        """Tokens merged in each of the ``blocks`` blocks the stage spans, bringing ``n``
        mergeable (patch) tokens to ``keep``; a :class:`TokensieveError` if it cannot."""
        if self.r is None:
            return budget_schedule(n, keep, blocks)
        *applied, left = schedule_leaves(n, parse_r(self.r, blocks))
        if left != keep:
            raise TokensieveError(f"tome: r={self.r} over {blocks} blocks leaves {left} of {n} tokens, not the "
                                  f"budget of {keep}; set the budget to {left} or leave r unset")
        return applied

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if not self.one_site and not site.startswith("vision."):
            raise TokensieveError(f"tome merges inside the vision tower's blocks (the released mechanism), not at "
                                  f"{site}; set one_site=True to merge at {site} at once (ours)")

    def select(self, inputs: SiteInputs) -> Selection:
        if not self.one_site:
            raise TokensieveError(f"tome merges inside the vision tower's blocks; this engine asked it to choose at "
                                  f"{inputs.site} at once, which is one_site=True (ours)")
        metric = None
        if inputs.keep < inputs.tokens.shape[1] and "keys" in inputs.signals:
            metric = inputs.signal("keys")
        indices, merged = tome_merge(inputs.tokens, inputs.keep, metric)
        return Selection(indices, merged)
