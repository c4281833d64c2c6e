"""VisionZip on Qwen-VL reproduces the authors' own Qwen2.5-VL port (JIA-Lab-research/VisionZip,
``Qwen2_5_VL/qwen2_5vl_visionzip.py``): its signal (the attention each merged token receives in the
tower's last block, window order undone; keys per merged token) and its selection (65% dominant,
max(5%, 1) contextual tokens merged into their targets, which stay at their own columns).

The fixture holds seeded last-block queries and keys in window order, a prompt's embeddings, and what
the authors' lines returned for them (tests/fixtures/parity/visionzip_qwen.json says which lines).
"""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import assert_close_relative, load_fixture

from tokensieve.backbones.qwen_tower import per_token, received_attention
from tokensieve.method import SiteInputs
from tokensieve.methods.visionzip import VisionZip, visionzip_split

TENSORS, META = load_fixture("visionzip_qwen")
CASES = META["cases"]


def our_signals(case: str) -> dict[str, torch.Tensor]:
    """Our tower signals from the fixture's queries and keys: ``(N,)`` and ``(N, d)``."""
    q, k = TENSORS[f"{case}.q"], TENSORS[f"{case}.k"]
    order = torch.argsort(TENSORS[f"{case}.window_index"])
    spans = torch.tensor([0, q.shape[0]])
    return {"received_attention": per_token(received_attention(q, k, spans, q.shape[-1] ** -0.5), 4, order),
            "keys": per_token(k.mean(1), 4, order)}


@pytest.mark.parametrize("case", list(CASES))
def test_tower_signals_equal_the_ports(case):
    signals = our_signals(case)
    assert_close_relative(signals["received_attention"], TENSORS[f"{case}.received_attention"])
    assert_close_relative(signals["keys"], TENSORS[f"{case}.keys"])


@pytest.mark.parametrize("case", list(CASES))
def test_selection_and_merge_equal_the_ports(case):
    spec = CASES[case]
    n, start, keep = spec["n"], spec["image_start"], spec["dominant"] + spec["contextual"]
    method = VisionZip(spec["dominant"] / keep, cls="drop", order="positions", importance="received_attention")
    assert visionzip_split(keep, method.dominant_ratio) == (spec["dominant"], spec["contextual"])
    assert not method.makes_extra_tokens
    embeds = TENSORS[f"{case}.inputs_embeds"]
    tokens = embeds[:, start:start + n]
    signals = our_signals(case)
    sel = method.select(SiteInputs(tokens, keep, "projector", [torch.Generator()],
                                   {name: (lambda v=v: v[None]) for name, v in signals.items()}))
    assert sel.order is None and sel.extra is None
    kept = TENSORS[f"{case}.kept_columns"]
    assert torch.equal(sel.indices[0], kept[start:start + n].nonzero().flatten())
    # the image run the LLM receives: the kept tokens in place, contextual ones merged into their targets
    ours = torch.cat([embeds[:, :start], sel.tokens, embeds[:, start + n:]], 1)
    assert_close_relative(ours, TENSORS[f"{case}.inputs_embeds_out"])
