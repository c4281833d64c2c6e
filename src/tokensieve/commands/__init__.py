"""The subcommands of the ``tokensieve`` command: each module adds its parsers (``add(sub)``) and
the function each one runs; :mod:`tokensieve.cli` puts them together."""
