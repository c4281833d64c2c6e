"""A processor batch padded on the other side, for the contract that padding's side changes nothing."""

from __future__ import annotations

# The per-column inputs a processor gives (besides these, pixel values and grids are per image).
COLUMNS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def right_padded(batch: dict) -> dict:
    """``batch`` (padded on the left) with each row's padding moved after its real tokens."""
    pads = (batch["attention_mask"] == 0).sum(1).tolist()
    assert any(pads) and not bool((batch["attention_mask"][:, -1] == 0).any()), "a left-padded batch with padding"
    rolled = {key: batch[key].clone() for key in COLUMNS if batch.get(key) is not None}
    for b, pad in enumerate(pads):
        for value in rolled.values():
            value[b] = value[b].roll(-pad)
    return {**batch, **rolled}
