"""Warnings shown only when the work that raised them succeeds."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def warnings_held_until_success() -> Iterator[None]:
    """Hold back the warnings raised inside; show them if the block ends normally, drop them if it
    raises, so a failed load ends in one line rather than in the warnings that led up to it."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
