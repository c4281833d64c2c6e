"""Backbone adapters: the only code that knows where a model keeps its modules."""

from tokensieve.backbones.hf_llava import LlavaBackbone, Site

__all__ = ["LlavaBackbone", "Site"]
