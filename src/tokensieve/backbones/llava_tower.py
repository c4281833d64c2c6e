"""The LLaVA session's stages before the LLM: in the vision tower (``vision.i``, cut before block
``i``, or ToMe merging inside blocks ``i..``), at the projector's input (``projector``) and at its
output (``llm.0``, the LLM's input embeddings of the image).

``hard`` gathers the kept tokens ``(B, prefix + k, d)`` (CLS, when it is a prefix, stays first);
``soft`` keeps every token and marks the dropped ones: in the tower with an additive key bias
``log(mask)`` on every later block, before the LLM through ``patch_alive`` (the adapter gives
them a zero attention mask). A mixin of
:class:`~tokensieve.backbones.llava_pruning.LlavaPruningSession`: it reads and writes the
session's tower state (``tower_origin``, ``patch_alive``, ``patch_key_mask``, ``vision_bias``,
``sizes``).
"""

from __future__ import annotations

import torch

from tokensieve.backbones.base import Site
from tokensieve.backbones.block_merging import BlockMerger
from tokensieve.backbones.llama_decoder import log_mask
from tokensieve.backbones.stage_plan import EXTRA
from tokensieve.errors import TokensieveError
from tokensieve.ops import gather_tokens


class TowerReductions:
    """Hooks of the stages before the LLM (mixin of the LLaVA session)."""

    def _register_tower(self) -> None:
        hooks, bb = self.handle.hooks, self.bb
        hooks.append(bb.vision_layers[0].register_forward_pre_hook(self._tower_start))
        vision = sorted(s.layer for s in self.stages if s.stage == "vision")
        if vision:
            for i in range(vision[0], len(bb.vision_layers)):
                hooks.append(bb.vision_layers[i].register_forward_pre_hook(self._vision_layer(i)))
        self._install_merges()
        if any(s.stage == "projector" for s in self.stages):
            hooks.append(bb.projector.register_forward_pre_hook(self._projector))
        if any(str(s) == "llm.0" for s in self.stages):
            hooks.append(bb.projector.register_forward_hook(self._after_projector))

    def _tower_start(self, _module, args):
        if self.handle.active:
            self.begin_image_pass()
            self.sizes.value = None

    def _install_merges(self) -> None:
        """In-block stages, after the cuts' pre-hooks (a block's proportional-attention bias must
        see the tokens a cut left)."""
        for site, schedule in sorted(self.plan.schedules.items(), key=lambda item: item[0].layer):
            st = self.stages[site]
            if not any(schedule.values()):  # the budget keeps every token: reported, nothing merges
                self.handle.hooks.append(self.bb.vision_layers[site.layer].register_forward_pre_hook(
                    lambda _m, args, site=site: self._merged(site)(site.layer, None) if self.handle.active else None))
                continue
            merger = BlockMerger(self.bb.vision_layers, schedule, class_token=True, prop_attn=st.method.prop_attn,
                                 sizes=self.sizes, active=lambda: self.handle.active, on_merge=self._merged(site),
                                 scoring=self.handle.scoring)
            self.handle.hooks.extend(merger.install())

    def _merged(self, site):
        """After each merging block of the in-block stage at ``site``: follow the patches behind the
        tower's tokens (in ToMe's order, which the LLM receives), and report the stage after its last."""
        schedule, (n, _) = self.plan.schedules[site], self.plan.counts[site]
        last = max((block for block, r in schedule.items() if r > 0), default=site.layer)

        def fn(block: int, order: torch.Tensor | None) -> None:
            if order is not None:
                origin = self.tower_origin if self.tower_origin is not None else torch.arange(
                    order.shape[1] - 1 + schedule[block], device=order.device).expand(order.shape[0], -1)
                self.tower_origin = origin.gather(1, order[:, 1:] - 1)  # CLS stays first
            if block == last:
                b = order.shape[0] if order is not None else self._batch
                if self.tower_origin is None:
                    self.tower_origin = torch.arange(n).expand(b, -1)
                self.plan.record_merged(self.handle, site, b, self.tower_origin)
        return fn

    def _vision_layer(self, i: int):
        site = Site("vision", i)

        def hook(_module, args):
            if not self.handle.active:
                return None
            hidden, mask = args[0], args[1] if len(args) > 1 else None
            self._batch = hidden.shape[0]
            if site in self.stages and site not in self.plan.schedules:
                hidden = self._reduce_tower(site, hidden, key=str(site), prefix=self.bb.prefix_tokens(site))
            if self.vision_bias is not None:
                bias = self.vision_bias.to(hidden.dtype)
                mask = bias if mask is None else mask + bias
            return (hidden, mask, *args[2:])
        return hook

    def _projector(self, _module, args):
        if not self.handle.active:
            return None
        site = Site("projector")
        return (self._reduce_tower(site, args[0], key="projector", prefix=self.bb.prefix_tokens(site)), *args[1:])

    def _after_projector(self, _module, args, output):
        if not self.handle.active:
            return None
        site = Site("llm", 0)
        prefix = self.bb.prefix_tokens(site)
        return self._reduce_tower(site, output, key="llm.0", prefix=prefix,
                                  own={"projector_input": args[0][:, prefix:]})

    def _reduce_tower(self, site, hidden: torch.Tensor, key: str, prefix: int,
                      own: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Vision-side stage on ``hidden`` ``(B, prefix + N, d)``; hard shortens it. own: signals of
        this site ``(B, N, ...)`` over its ``N`` tokens (the projector's input at ``llm.0``)."""
        b = hidden.shape[0]
        patches = hidden[:, prefix:]
        alive = self.patch_alive if self.mode == "soft" else None

        def candidates_of(x: torch.Tensor) -> torch.Tensor:
            return x if alive is None else x.gather(1, alive[..., None].expand(-1, -1, x.shape[-1]))

        candidates = candidates_of(patches)
        signal_offset = 1  # captured tower signals always include CLS at column 0
        signals = self._signals(key, alive, signal_offset)
        signals.update({name: (lambda x=x: candidates_of(x)) for name, x in (own or {}).items()})
        sel = self._choose(site, candidates, signals, self._question_before_llm)
        if sel.key_mask is not None and self.mode == "soft" and site.stage == "vision":
            raise TokensieveError(f"{self.stages[site].method.name} at {site}: a soft key mask is only "
                                  "supported at the projector and inside the LLM")
        values = sel.tokens if sel.tokens is not None else candidates.gather(
            1, sel.indices[..., None].expand(-1, -1, candidates.shape[-1]))
        if self.mode == "hard":
            origin = self.tower_origin if self.tower_origin is not None else torch.arange(
                patches.shape[1], device=hidden.device).expand(b, -1)
            origin = origin.gather(1, sel.indices)
            if sel.order is not None:  # the paper's emission order
                values, origin = gather_tokens(values, sel.order), origin.gather(1, sel.order)
            if sel.extra is not None:  # tokens the method made join the run, marked as such
                made = origin.new_full(sel.extra.shape[:2], EXTRA)
                extra = sel.extra.to(values.dtype)
                values = torch.cat([extra, values] if sel.extra_first else [values, extra], 1)
                origin = torch.cat([made, origin] if sel.extra_first else [origin, made], 1)
            self.tower_origin = origin
            self._record_kept(site, self.tower_origin)
            if site.stage == "vision" and self.sizes.value is not None:  # kept tokens keep what they stand for
                sizes = self.sizes.value
                self.sizes.value = torch.cat([sizes[:, :prefix], sizes[:, prefix:].gather(1, sel.indices)], 1)
            return torch.cat([hidden[:, :prefix], values], 1)
        chosen = sel.indices if alive is None else alive.gather(1, sel.indices)  # into all N patches
        self._record_kept(site, chosen)
        self.patch_alive = chosen
        if self.mode == "soft" and site.stage != "vision":
            self.patch_key_mask = sel.key_mask
        patches = patches.scatter(1, chosen[..., None].expand(-1, -1, patches.shape[-1]), values)
        if site.stage == "vision":
            keep = torch.ones(b, hidden.shape[1], dtype=torch.bool, device=hidden.device)
            keep[:, prefix:] = False
            keep[:, prefix:].scatter_(1, chosen, True)
            self.vision_bias = log_mask(keep, hidden.dtype)[:, None, None, :]
        return torch.cat([hidden[:, :prefix], patches], 1)

