"""tokensieve's version, readable from any layer (reports and run records name it)."""

__version__ = "0.1.0"
