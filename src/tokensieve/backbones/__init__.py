"""Backbone adapters: the only code that knows where a model keeps its modules.

``Site`` and the ``Backbone`` protocol load with the package; an adapter loads its model library
(transformers, open_clip) only when it is asked for, so :func:`tokensieve.attach` can check a
backbone against the protocol without importing any of them.
"""

from tokensieve.backbones.base import Backbone, Site

__all__ = ["Backbone", "LlavaBackbone", "Site"]


def __getattr__(name: str):
    if name == "LlavaBackbone":  # imports transformers: only on first use
        from tokensieve.backbones.hf_llava import LlavaBackbone

        return LlavaBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
