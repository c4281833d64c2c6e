"""The methods by name: importing this package registers the built-in methods, and
:func:`create_method` finds any registered one (built-in or a user's, see
:func:`tokensieve.method.register`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, registered
from tokensieve.methods import (
    anchor,  # noqa: F401
    cdpruner,  # noqa: F401
    dart,  # noqa: F401
    divprune,  # noqa: F401
    dycoke,  # noqa: F401
    fastervlm,  # noqa: F401
    fastv,  # noqa: F401
    hired,  # noqa: F401
    layer_pruner,  # noqa: F401
    prumerge,  # noqa: F401
    pyramiddrop,  # noqa: F401
    random_keep,  # noqa: F401
    sparsevlm,  # noqa: F401
    token_merger,  # noqa: F401
    tome,  # noqa: F401
    visionzip,  # noqa: F401
    vispruner,  # noqa: F401
)


def list_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(registered())


def method_class(name: str) -> type[Method]:
    if name not in registered():
        raise TokensieveError(f"unknown method {name!r}; known methods: {', '.join(sorted(registered()))}")
    return registered()[name]


def method_label(spec: str | dict[str, Any]) -> str:
    """How a result row names a method: a name as it is; a config its name and parameters,
    ``pyramiddrop(positions=original)`` (two settings of one method are two rows, in every table and figure)."""
    if isinstance(spec, str):
        return spec
    params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({params})" if params else spec["name"]


def create_method(spec: str | dict[str, Any] | Method, **params: Any) -> Method:
    """A method from a name (plus parameters), a config dict ``{"name": ..., ...}`` or an instance."""
    if isinstance(spec, Method):
        return dataclasses.replace(spec, **params) if params else spec
    if isinstance(spec, dict):
        params = {**{k: v for k, v in spec.items() if k != "name"}, **params}
        if "name" not in spec:
            raise TokensieveError(f"method config {spec} has no 'name'")
        spec = spec["name"]
    cls = method_class(spec)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise TokensieveError(f"unknown parameter(s) {', '.join(unknown)} for method {spec!r}; "
                              f"its parameters are: {', '.join(sorted(known)) or 'none'}")
    return cls(**params)
