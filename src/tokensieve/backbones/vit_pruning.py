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
  the speed benchmark).

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
from tokensieve.backbones.stage_plan import (
    check_selection,
    merges_in_blocks,
    row_generator,
)
from tokensieve.errors import TokensieveError
from tokensieve.method import SiteInputs

SIGNALS = ("cls_attention", "keys", "attention")


class ViTPruningSession:
    """The hooks of one handle on one ViT adapter, and the state of one forward pass."""

    def __init__(self, backbone, handle, seed: int):
        if handle.mode != "hard":
            raise TokensieveError(f"mode {handle.mode!r} is not available in a CLIP vision tower; use hard")
        self.bb, self.handle, self.seed = backbone, handle, seed
        self.stages: dict = {}
        for st in handle.stages:
            site = Site.parse(st.site)
            in_blocks = merges_in_blocks(st.method)
            if site not in backbone.sites() and not (in_blocks and site == Site("vision", 0)):
                first = 0 if in_blocks else 1
                raise TokensieveError(f"site {site} does not exist in this {backbone.depth}-block ViT; sites are "
                                      f"vision.{first} .. vision.{backbone.depth - 1}")
            if "vision" not in st.method.stages:
                raise TokensieveError(f"method {st.method.name!r} cannot act in a vision tower "
                                      f"(it acts at: {', '.join(st.method.stages)})")
            missing = sorted(set(st.method.signals) - set(SIGNALS))
            if missing:
                raise TokensieveError(f"method {st.method.name!r} needs {', '.join(missing)}, which a CLIP "
                                      "vision tower does not have")
            if site in self.stages:
                raise TokensieveError(f"two stages at site {site}")
            self.stages[site] = st
        self.schedules: dict = {}  # site -> {block: tokens merged there}, for stages merging inside blocks
        self.counts: dict = {}  # site -> (patch tokens at the site, budget)
        self._check_budgets()
        self._inputs: dict[int, torch.Tensor] = {}  # block -> the normalised states its attention saw
        self.positions: torch.Tensor | None = None  # (B, n) original patch index of each patch token
        self.sizes = TokenSizes()  # (B, 1 + n) patches each token stands for, once a stage has merged
        self._register()

    def _check_budgets(self) -> None:
        """Resolve every budget against the patch tokens its site will see, before any model work."""
        n = self.bb.n_patches
        sites = sorted(self.stages, key=lambda s: s.layer)
        for site, end in zip(sites, [s.layer for s in sites[1:]] + [self.bb.depth]):
            st = self.stages[site]
            keep = st.budget.resolve(n, f"{site} ({n} patch tokens + CLS)")
            st.method.check(n, keep, str(site))
            if merges_in_blocks(st.method):
                try:
                    r = st.method.merge_schedule(n, keep, end - site.layer)
                except TokensieveError as e:
                    upto = f"the next stage at vision.{end}" if end < self.bb.depth else "the end of the tower"
                    raise TokensieveError(f"{st} merges in blocks {site.layer}..{end - 1} (up to {upto}): {e}") from None
                self.schedules[site] = {site.layer + i: r_i for i, r_i in enumerate(r)}
            self.counts[site] = (n, keep)
            n = keep

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
        st, (n, keep) = self.stages[site], self.counts[site]
        last = max(b for b, r in self.schedules[site].items() if r > 0)

        def fn(block: int, order: torch.Tensor) -> None:
            self.positions = self.positions.gather(1, order[:, 1:] - 1)  # CLS stays first
            if block == last:
                b = order.shape[0]
                self.handle.record_counts(str(st), torch.full((b,), n), torch.full((b,), keep))
                self.handle.last_kept[str(st)] = self.positions
        return fn

    def _unchanged(self, site):
        st, (n, keep) = self.stages[site], self.counts[site]

        def hook(_module, args):
            if self.handle.active:
                b = args[0].shape[0]
                self.handle.record_counts(str(st), torch.full((b,), n), torch.full((b,), keep))
                self.handle.last_kept[str(st)] = self.positions
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
            keep = st.budget.resolve(t - 1, str(site))
            with self.handle.scoring():
                inputs = SiteInputs(patches, keep, str(site), lambda: row_generator(self.seed, patches),
                                    self._signals(site.layer - 1))
                sel = st.method.select(inputs)
                check_selection(sel, b, t - 1, keep, f"{st.method.name} at {site}")
            self._inputs.pop(site.layer - 1, None)
            values = sel.tokens if sel.tokens is not None else patches.gather(1, sel.indices[..., None].expand(-1, -1, d))
            self.positions = self.positions.gather(1, sel.indices)
            if self.sizes.value is not None:  # the kept tokens keep what they stand for
                self.sizes.value = torch.cat([self.sizes.value[:, :1], self.sizes.value[:, 1:].gather(1, sel.indices)], 1)
            self.handle.record_counts(str(st), torch.full((b,), t - 1), torch.full((b,), keep))
            self.handle.last_kept[str(st)] = self.positions
            return (torch.cat([hidden[:, :1], values.to(hidden.dtype)], 1), *args[1:])
        return hook
