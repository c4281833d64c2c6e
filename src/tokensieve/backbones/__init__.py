"""Backbone adapters: the only code that knows where a model keeps its modules."""

from tokensieve.backbones.base import Site
from tokensieve.backbones.hf_llava import LlavaBackbone

__all__ = ["LlavaBackbone", "Site"]
