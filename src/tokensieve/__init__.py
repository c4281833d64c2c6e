"""tokensieve: prune and merge visual tokens in vision-language models and CLIP ViTs, and measure it."""

from tokensieve.optional import shim_torchvision_when_imported

shim_torchvision_when_imported()  # transformers imports torchvision when installed: see tokensieve/optional.py

from tokensieve.attach import Handle, attach
from tokensieve.method import Budget, Method, Selection, SiteInputs, register
from tokensieve.methods import create_method, list_methods
from tokensieve.version import __version__  # noqa: F401  (tokensieve.__version__)

__all__ = ["Budget", "Handle", "Method", "Selection", "SiteInputs", "attach", "create_method", "list_methods",
           "register"]
