"""Reduction stages inside a CLIP vision transformer, through forward pre-hooks.

Shared by the open_clip and transformers CLIP adapters (``open_clip_vit.py``, ``hf_clip.py``),
which supply the module paths through a small interface:

* ``blocks``: the transformer blocks; a pre-hook on block ``i`` sees its input ``(B, 1 + n, d)``
  (CLS first) as the first positional argument;
* ``hook_attention_input(i, fn)``: call ``fn(x)`` with the normalised ``(B, T, d)`` states block
  ``i``'s attention receives, return a removable hook;
* ``queries(i, x)`` / ``keys(i, x)``: block ``i``'s own projections of ``x`` as ``(B, H, T, d_h)``,
  and ``attention_scale(i)``;
* ``depth``, ``n_patches`` and ``sites()`` (``geometry``, ``image_size`` and ``encode_images`` serve
  the speed benchmark); the signals at each site are :func:`vit_signals_at`'s.

The stages are checked and their budgets chained by :class:`ViTStagePlan` (the shared
:class:`~tokensieve.backbones.stage_plan.StagePlan`) when the session is installed.

A stage at site ``vision.i`` (``1 <= i < depth``) chooses patch tokens before block ``i``, from
the signals of block ``i - 1``'s attention (so block 0, which has no earlier attention, is
never a site): ``cls_attention`` ``(B, n)``, ``keys`` ``(B, n, d_h)`` (mean over heads) and
``attention`` ``(B, n, n)`` (head-averaged, rows normalised over all ``1 + n`` tokens). They are
recomputed from the block's own q/k projections only when a method asks, so the model's fused
attention stays on. Every row chooses for itself; the kept tokens are gathered (``hard`` mode),
CLS stays at index 0, and later blocks run on the shorter sequence.

A method that merges inside blocks (``merges_in_blocks``, ToMe) is not asked at its site: its
stage at ``vision.i`` (``vision.0`` allowed) merges inside blocks ``i`` up to the next stage or
the end of the tower, as its ``merge_schedule(n, keep, blocks)`` says, through the hooks of
:mod:`tokensieve.backbones.block_merging`; its budget is what is left there. Token sizes carry
on through later stages (a cut keeps the kept tokens' sizes), so proportional attention holds
to the end of the tower.
"""

from __future__ import annotations

import torch

from tokensieve.backbones.attention_signals import cls_attention, head_mean_attention
from tokensieve.backbones.base import Site
from tokensieve.backbones.block_merging import BlockMerger, TokenSizes
from tokensieve.backbones.stage_plan import StagePlan, merges_in_blocks, row_generator
from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs

SIGNALS = ("cls_attention", "keys", "attention")


def vit_signals_at(backbone, site: Site) -> set[str]:
    """The signals of a ViT adapter at ``site``: :data:`SIGNALS` at each of its sites (``vision.i``,
    ``i >= 1``, from block ``i - 1``'s attention), none elsewhere."""
    return set(SIGNALS) if site in backbone.sites() else set()


class ViTStagePlan(StagePlan):
    """The stage plan in a CLIP ViT: patch tokens after CLS, in-block stages up to the end of the tower."""

    def __init__(self, backbone, handle):
        self.depth = backbone.depth
        super().__init__(handle.stages, handle.mode, backbone.sites(), backbone.signals_at,
                         backbone.n_patches, keeps_cls=False, tower_end=backbone.depth, check=handle.check)

    def missing_site(self, site: Site, st) -> TokensieveError:
        first = 0 if merges_in_blocks(st.method) else 1
        return TokensieveError(f"site {site} does not exist in this {self.depth}-block ViT; sites are "
                               f"vision.{first} .. vision.{self.depth - 1}")

    def place(self, site: Site) -> str:
        return "in a vision tower"

    def budget_where(self, site: Site, n: int) -> str:
        return f"{site} ({n} patch tokens + CLS)"

    def merge_span(self, site: Site, end: int) -> str:
        upto = f"the next stage at vision.{end}" if end < self.depth else "the end of the tower"
        return f"{site.layer}..{end - 1} (up to {upto})"


class ViTPruningSession:
    """The hooks of one handle on one ViT adapter, and the state of one forward pass."""

    def __init__(self, backbone, handle, seed: int):
        if handle.mode != "hard":
            raise TokensieveError(f"mode {handle.mode!r} is not available in a CLIP vision tower; use hard")
        self.bb, self.handle, self.seed = backbone, handle, seed
        self.plan = ViTStagePlan(backbone, handle)
        self.stages, self.schedules = self.plan.stages, self.plan.schedules
        self._inputs: dict[int, torch.Tensor] = {}  # block -> the normalised states its attention saw
        self.positions: torch.Tensor | None = None  # (B, n) original patch index of each patch token
        self.sizes = TokenSizes()  # (B, 1 + n) patches each token stands for, once a stage has merged
        self._register()

    def _register(self) -> None:
        hooks = self.handle.hooks
        hooks.append(self.bb.blocks[0].register_forward_pre_hook(self._start))
        for site, st in self.stages.items():
            if site not in self.schedules:
                if set(SIGNALS) & set(st.method.signals):
                    hooks.append(self.bb.hook_attention_input(site.layer - 1, self._remember(site.layer - 1)))
                hooks.append(self.bb.blocks[site.layer].register_forward_pre_hook(self._reduce(site)))
        # After the cuts: a block's proportional-attention bias must see the tokens the cut left.
        starts = sorted(self.schedules, key=lambda s: s.layer)
        for site, after in zip(starts, starts[1:] + [None]):
            st = self.stages[site]
            if any(self.schedules[site].values()):
                merger = BlockMerger(self.bb.blocks, self.schedules[site], class_token=True,
                                     prop_attn=st.method.prop_attn, until=after.layer if after else None,
                                     sizes=self.sizes, active=lambda: self.handle.active,
                                     on_merge=self._merged(site), scoring=self.handle.scoring)
                hooks.extend(merger.install())
            else:  # the budget keeps every token: nothing merges, the stage is still reported
                hooks.append(self.bb.blocks[site.layer].register_forward_pre_hook(self._unchanged(site)))

    def _start(self, _module, args):
        if self.handle.active:
            self._inputs.clear()
            b, t = args[0].shape[:2]
            self.positions = torch.arange(t - 1, device=args[0].device).expand(b, -1)
            self.sizes.value = None

    def _merged(self, site):
        """After each merging block of the stage at ``site``: follow the patches, report the last."""
        last = max(b for b, r in self.schedules[site].items() if r > 0)

        def fn(block: int, order: torch.Tensor) -> None:
            self.positions = self.positions.gather(1, order[:, 1:] - 1)  # CLS stays first
            if block == last:
                self.plan.record_merged(self.handle, site, order.shape[0], self.positions)
        return fn

    def _unchanged(self, site):
        def hook(_module, args):
            if self.handle.active:
                self.plan.record_merged(self.handle, site, args[0].shape[0], self.positions)
        return hook

    def _remember(self, block: int):
        def fn(x: torch.Tensor) -> None:
            if self.handle.active:
                self._inputs[block] = x
        return fn

    def _signals(self, block: int) -> dict:
        """Lazy signals over the patch tokens from block ``block``'s attention input."""
        if block not in self._inputs:
            return {}
        x = self._inputs[block]
        bb, cache = self.bb, {}

        def keys() -> torch.Tensor:  # (B, H, T, d_h)
            if "k" not in cache:
                cache["k"] = bb.keys(block, x)
            return cache["k"]

        def cls_row() -> torch.Tensor:
            return cls_attention(bb.queries(block, x[:, :1]), keys(), bb.attention_scale(block), upcast=True)[:, 1:]

        def rows() -> torch.Tensor:
            q = bb.queries(block, x[:, 1:])
            return head_mean_attention(q, keys(), bb.attention_scale(block), upcast=True)[:, :, 1:]

        return {"cls_attention": cls_row, "keys": lambda: keys().mean(1)[:, 1:], "attention": rows}

    def _reduce(self, site):
        st = self.stages[site]

        def hook(_module, args):
            if not self.handle.active:
                return None
            hidden = args[0]  # (B, 1 + n, d)
            b, t, d = hidden.shape
            patches = hidden[:, 1:]
            keep = self.plan.keep_at(site, t - 1)
            with self.handle.scoring():
                inputs = SiteInputs(patches, keep, str(site), lambda: row_generator(self.seed, patches),
                                    self._signals(site.layer - 1))
                sel = self.plan.settle(site, st.method.select(inputs), b, t - 1, keep)
            self._inputs.pop(site.layer - 1, None)
            values = sel.tokens if sel.tokens is not None else patches.gather(1, sel.indices[..., None].expand(-1, -1, d))
            self.positions = self.positions.gather(1, sel.indices)
            if self.sizes.value is not None:  # the kept tokens keep what they stand for
                self.sizes.value = torch.cat([self.sizes.value[:, :1], self.sizes.value[:, 1:].gather(1, sel.indices)], 1)
            self.plan.record(self.handle, site, sel, t - 1)
            self.handle.last_kept[str(st)] = self.positions
            return (torch.cat([hidden[:, :1], values.to(hidden.dtype)], 1), *args[1:])
        return hook
