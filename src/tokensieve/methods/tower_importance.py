"""Which tower signal ranks the tokens of a CLS-attention method: the paper's ``cls_attention``, or
``received_attention`` for towers without a CLS token (the Qwen-VL family).

``received_attention`` ``(B, N)`` is the attention each visual token receives from the others in the
tower's last block (softmax per head over the block's attention span, mean over heads, summed over
the queries); the Qwen-VL adapter gives it per merged token (docs/methods.md).
"""

from __future__ import annotations

from tokensieve.errors import TokensieveError

IMPORTANCE_CHOICES = ("cls_attention", "received_attention")


def importance_signals(method: str, importance: str, paper_signals: tuple[str, ...]) -> tuple[str, ...]:
    """The signals a method needs when it ranks by ``importance``: ``paper_signals`` with
    ``cls_attention`` replaced by ``received_attention`` where asked."""
    if importance not in IMPORTANCE_CHOICES:
        raise TokensieveError(f"{method}: importance {importance!r} is not one of {', '.join(IMPORTANCE_CHOICES)}")
    return tuple(importance if s == "cls_attention" else s for s in paper_signals)

