"""Where a Qwen-VL tower looks: each image's ``received_attention`` (the attention its tokens receive in the
tower's last block, the signal VisionZip's Qwen2.5-VL port ranks by), read by a method that keeps every token
at ``projector``, so the model answers as it does unpruned (keep-all is bit-exact)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from tokensieve.attach import attach
from tokensieve.method import Method, Selection, SiteInputs


@dataclass
class ReceivedAttentionRecorder(Method):
    """Keeps every token; appends each image's ``received_attention`` ``(N_i,)`` (float32, on the CPU) to
    ``seen``, in the order the images are passed (prompt order over each batch)."""

    name = "received_attention_recorder"
    stages = ("projector",)
    default_site = "projector"
    signals = ("received_attention",)

    seen: list = field(default_factory=list, repr=False, compare=False, metadata={"state": True})

    def select(self, inputs: SiteInputs) -> Selection:
        attention = inputs.signal("received_attention")  # (G, N_i): images in prompt order
        self.seen.extend(row.float().cpu() for row in attention)
        b, n = inputs.tokens.shape[:2]
        return Selection(torch.arange(n, device=inputs.tokens.device).expand(b, n))


@contextmanager
def recorded_received_attention(backbone) -> Iterator[list[torch.Tensor]]:
    """While inside, every image's ``(N_i,)`` received attention in the list yielded (the model answering as
    it does unpruned)."""
    recorder = ReceivedAttentionRecorder()
    handle = attach(backbone, recorder, 1.0)
    try:
        yield recorder.seen
    finally:
        handle.detach()
