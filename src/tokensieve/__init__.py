"""tokensieve: prune and merge visual tokens in VLMs and CLIP ViTs, and measure the cost."""

__version__ = "0.1.0"
