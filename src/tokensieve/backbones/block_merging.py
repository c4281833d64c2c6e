"""ToMe's merge inside transformer blocks, between attention and MLP, through hooks only.

No ``forward`` is copied or replaced. In a block that merges ``r`` tokens:

* a forward hook on the attention's key projection keeps the metric: the keys ``(B, T, d)``
  averaged over heads ``(B, T, d_h)``;
* a forward pre-hook on the block's second LayerNorm (its input ``y`` is the state between
  attention and MLP) runs the bipartite matching and replaces every token by the size-weighted
  mean ``y_g`` of its merge group, so the MLP sees the merged states (``T`` rows, duplicated);
* a forward hook on the block (prepended, so it runs before transformers' output recorders)
  takes the size-weighted mean of the block's output over each group, in ToMe's order. That
  is exactly ToMe's output: ``out_i = y_i + MLP(LN2(y_g))`` and the MLP term is the same for the
  whole group, so the mean is ``y_g + MLP(LN2(y_g))``.

Proportional attention: a forward pre-hook on every block from the first merging one (up to
``until``) adds ``log(size)`` to the attention logits of each key column once sizes exist, through
the block's additive mask.
The merging block's MLP still runs on ``T`` rows; later blocks run on ``T - r``.

Supported blocks: transformers ``CLIPEncoderLayer`` and alike (``layer_norm2``,
``self_attn.k_proj``, ``self_attn.num_heads``, additive ``attention_mask`` as the second
argument; SigLIP's layers have the same layout) and open_clip ``ResidualAttentionBlock`` (``ln_2``,
``attn`` an ``nn.MultiheadAttention``, ``attn_mask`` keyword).

An engine runs a stage of a method with ``merges_in_blocks`` (ToMe) by building a
:class:`BlockMerger` with the schedule its stage plan made (``StagePlan.schedules``:
``method.merge_schedule(n, keep, end - first)`` over blocks ``first .. end - 1``, ``end`` the next
stage's block or the end of the tower), installing it after its own pre-hooks that cut tokens, and
following the tokens through ``on_merge`` (see ``vit_pruning.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tokensieve.errors import TokensieveError
from tokensieve.methods.tome import bipartite_matching, merge_wavg


@dataclass
class BlockParts:
    """Where the merge reaches into one block.

    mlp_norm: the LayerNorm whose input is the state between attention and MLP.
    hook_keys(fn): registers ``fn(keys (B, T, d))`` with the block's attention keys (full width).
    heads: attention heads (the metric is the keys' mean over them).
    add_bias(args, kwargs, bias): the block's call with ``bias`` ``(B, T)`` added to the
        attention logits of each key column.
    """

    mlp_norm: nn.Module
    hook_keys: Callable[[Callable[[torch.Tensor], None]], object]
    heads: int
    add_bias: Callable[[tuple, dict, torch.Tensor], tuple[tuple, dict]]


def block_parts(block: nn.Module) -> BlockParts:
    """The :class:`BlockParts` of a transformers CLIP-like layer or an open_clip residual block."""
    attn = getattr(block, "self_attn", None)
    if hasattr(block, "layer_norm2") and hasattr(attn, "k_proj") and hasattr(attn, "num_heads"):
        return BlockParts(block.layer_norm2, lambda fn: attn.k_proj.register_forward_hook(
            lambda _m, _args, keys: fn(keys)), attn.num_heads, _hf_bias)
    attn = getattr(block, "attn", None)
    if hasattr(block, "ln_2") and isinstance(attn, nn.MultiheadAttention) and attn.batch_first:
        def hook_keys(fn):
            def pre(_m, args):
                d = attn.embed_dim
                bias = None if attn.in_proj_bias is None else attn.in_proj_bias[d:2 * d]
                fn(F.linear(args[0], attn.in_proj_weight[d:2 * d], bias))
            return attn.register_forward_pre_hook(pre)
        return BlockParts(block.ln_2, hook_keys, attn.num_heads, _open_clip_bias(attn.num_heads))
    raise TokensieveError(f"cannot merge tokens inside a {type(block).__name__}: expected a transformers "
                          "CLIPEncoderLayer-like layer or an open_clip ResidualAttentionBlock")


def _hf_bias(args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """``attention_mask`` (2nd argument or keyword) plus ``bias`` as ``(B, 1, T, T)``."""
    t = bias.shape[1]
    full = bias[:, None, None, :].expand(-1, 1, t, t)
    if len(args) > 1:
        mask = args[1]
        return (args[0], full if mask is None else mask + full, *args[2:]), kwargs
    mask = kwargs.get("attention_mask")
    return args, {**kwargs, "attention_mask": full if mask is None else mask + full}


def _open_clip_bias(heads: int):
    def add(args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
        """``attn_mask`` keyword plus ``bias`` as ``(B * heads, T, T)`` (nn.MultiheadAttention's 3D form)."""
        b, t = bias.shape
        full = bias[:, None, None, :].expand(b, heads, t, t).reshape(b * heads, t, t)
        if len(args) > 3:
            raise TokensieveError("open_clip block called with a positional attn_mask; expected the keyword")
        mask = kwargs.get("attn_mask")
        return args, {**kwargs, "attn_mask": full if mask is None else mask.to(full.dtype) + full}
    return add


@dataclass
class TokenSizes:
    """How many original tokens each current token of a tower stands for: ``value`` ``(B, T)``
    (CLS included), ``None`` while nothing has merged. One holder may be shared by the merging
    stages of a tower; a stage that drops tokens gathers ``value`` with them."""

    value: torch.Tensor | None = None


class BlockMerger:
    """ToMe merging in some blocks of one tower; the state of the current forward pass.

    blocks: every block of the tower, in order.
    schedule: ``{block index: r}``, tokens merged in each block (each capped at half as
        released); the first key is where a forward pass starts (state reset).
    class_token: the sequence starts with a CLS token that never merges.
    prop_attn: blocks ``first .. until - 1`` add ``log(size)`` to their attention logits once
        sizes exist; ``until`` defaults to the end of the tower.
    sizes: a :class:`TokenSizes` shared with the stages before and after (the caller resets it at
        the start of each pass); default: this merger's own, reset at its first block.
    active: called by every hook; ``False`` makes the hooks do nothing (e.g. ``handle.active``).
    on_merge: called after each merging block as ``on_merge(block, order)`` with ``order``
        ``(B, T')`` the block's input token behind each output token (CLS stays at 0).
    scoring: a context manager factory timing the matching (e.g. ``handle.scoring``).

    State after a forward pass: ``sizes`` ``(B, T)`` (CLS included); ``source`` ``(B, T0)`` the
    current token each token entering the first merging block is now part of; ``survivors``
    ``(B, T)`` the token entering the first merging block that each current token is (its
    representative: an unmerged A token or a B token).
    """

    def __init__(self, blocks: Sequence[nn.Module], schedule: dict[int, int], *, class_token: bool,
                 prop_attn: bool = True, until: int | None = None, sizes: TokenSizes | None = None,
                 active: Callable[[], bool] = lambda: True,
                 on_merge: Callable[[int, torch.Tensor], None] | None = None,
                 scoring: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        if not schedule or min(schedule) < 0 or max(schedule) >= len(blocks):
            raise TokensieveError(f"merge schedule {schedule} names blocks outside 0..{len(blocks) - 1}")
        self.blocks, self.schedule = blocks, dict(sorted(schedule.items()))
        self.first = next(iter(self.schedule))
        self.until = len(blocks) if until is None else until
        self.class_token, self.prop_attn, self.active, self.on_merge = class_token, prop_attn, active, on_merge
        self.scoring, self.own_sizes = scoring, sizes is None
        self.state = TokenSizes() if sizes is None else sizes
        self.parts = {i: block_parts(blocks[i]) for i in self.schedule if self.schedule[i] > 0}
        self.biased = {i: block_parts(blocks[i]) for i in range(self.first, self.until)} if prop_attn else {}
        self.source: torch.Tensor | None = None
        self.survivors: torch.Tensor | None = None
        self._metric: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def sizes(self) -> torch.Tensor | None:
        return self.state.value

    def install(self) -> list:
        """Register the hooks; returns their removable handles (remove them to detach)."""
        handles = [self.blocks[self.first].register_forward_pre_hook(self._start)]
        for i, parts in self.biased.items():
            handles.append(self.blocks[i].register_forward_pre_hook(self._bias(parts), with_kwargs=True))
        for i, parts in self.parts.items():
            handles.append(parts.hook_keys(self._keep_metric(parts.heads)))
            handles.append(parts.mlp_norm.register_forward_pre_hook(self._merge_mlp_input(i)))
            handles.append(self.blocks[i].register_forward_hook(self._merge_output(i), prepend=True))
        return handles

    def _start(self, _module, args):
        if self.active():
            b, t = args[0].shape[:2]
            identity = torch.arange(t, device=args[0].device).expand(b, t)
            self.source, self.survivors = identity, identity
            self._metric = self._pending = None
            if self.own_sizes:
                self.state.value = None

    def _current_sizes(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self.state.value
        if sizes is None:
            return x.new_ones(x.shape[:2], dtype=torch.float32)
        if sizes.shape != x.shape[:2]:
            raise TokensieveError(f"token sizes {tuple(sizes.shape)} do not match the {x.shape[1]} tokens here")
        return sizes

    def _keep_metric(self, heads: int):
        def fn(keys: torch.Tensor) -> None:
            if self.active():
                b, t, _ = keys.shape
                self._metric = keys.view(b, t, heads, -1).mean(2)
        return fn

    def _merge_mlp_input(self, block: int):
        def hook(_norm, args):
            if not self.active():
                return None
            y = args[0]  # (B, T, d): the residual state after attention
            if self._metric is None or self._metric.shape[:2] != y.shape[:2]:
                raise TokensieveError(f"block {block}: no attention keys seen for the tokens it merges")
            sizes = self._current_sizes(y)
            with self.scoring():
                slot, order = bipartite_matching(self._metric, self.schedule[block], self.class_token)
            self._metric = None
            self._pending = (slot, order)
            merged, _ = merge_wavg(y, sizes, slot, order.shape[1])
            return (merged.gather(1, slot[..., None].expand_as(y)), *args[1:])
        return hook

    def _merge_output(self, block: int):
        def hook(_module, _args, output):
            if not self.active():
                return None
            if self._pending is None:
                raise TokensieveError(f"block {block} ran without its MLP LayerNorm: cannot merge its output")
            slot, order = self._pending
            self._pending = None
            out = output[0] if isinstance(output, tuple) else output
            merged, self.state.value = merge_wavg(out, self._current_sizes(out), slot, order.shape[1])
            self.source = slot.gather(1, self.source)
            self.survivors = self.survivors.gather(1, order)
            if self.on_merge is not None:
                self.on_merge(block, order)
            return (merged, *output[1:]) if isinstance(output, tuple) else merged
        return hook

    def _bias(self, parts: BlockParts):
        def hook(_module, args, kwargs):
            if not self.active() or self.state.value is None:
                return None
            hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("q_x"))
            return parts.add_bias(args, kwargs, self._current_sizes(hidden).log().to(hidden.dtype))
        return hook
