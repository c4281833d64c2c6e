"""Dataclasses are the source of truth for settings; YAML is how they are stored.

``from_dict`` checks a plain dict (read from YAML) against a dataclass, naming the full
dotted key of any unknown key or wrong type; ``to_dict`` goes back; ``apply_overrides``
sets dotted keys from the command line (``train.lr=1e-3``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from tokensieve.checkpoint import atomic_write_text
from tokensieve.errors import TokensieveError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats such as ``1e-3`` and ``1.0e3`` as floats.

    YAML 1.1 (what PyYAML implements) wants a dot and a signed exponent, so ``1e-3`` would be a string.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several lines and
    quotes the offending line)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = f" ({err.context})" if err.context else ""
        return f"{err.problem}{where}{context}"
    return " ".join(str(err).split())


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _wrong_type(key: str, tp: Any, value: Any) -> TokensieveError:
    return TokensieveError(f"config key '{key or '<top level>'}' expects {_type_name(tp)}, "
                           f"got {value!r} ({type(value).__name__})")


def _scalar(tp: type, value: Any, key: str) -> Any:
    """Check ``value`` against ``int``, ``float``, ``bool`` or ``str`` (bool is not an int; ints become floats)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and is_number:
        return float(value)
    if tp is int and is_number and isinstance(value, int):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise _wrong_type(key, tp, value)


def _union(tp: Any, value: Any, key: str) -> Any:
    """The first member of ``X | Y | None`` that accepts ``value``.

    A mapping or list that fits no member reports the error of its only candidate (it names the deeper key).
    """
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for member in (a for a in args if a is not type(None)):
        try:
            return _convert(member, value, key)
        except TokensieveError as err:
            errors.append(err)
    if len(errors) == 1 and isinstance(value, (dict, list)):
        raise errors[0]
    raise _wrong_type(key, tp, value)


def _literal(tp: Any, value: Any, key: str) -> Any:
    allowed = typing.get_args(tp)
    if any(value == a and type(value) is type(a) for a in allowed):
        return value
    raise TokensieveError(f"config key '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _sequence(tp: Any, value: Any, key: str) -> list | tuple:
    """``list[X]``, ``tuple[X, ...]`` or ``tuple[X, Y]`` from a YAML list."""
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(key, tp, value)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return [_convert(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise TokensieveError(f"config key '{key}' expects {len(args)} items ({_type_name(tp)}), got {value!r}")
    return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _mapping(tp: Any, value: Any, key: str) -> dict:
    """``dict[str, X]`` from a YAML mapping."""
    if not isinstance(value, dict):
        raise _wrong_type(key, tp, value)
    args = typing.get_args(tp)
    item = args[1] if args else Any
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TokensieveError(f"config key '{key}' expects string keys, got {bad[0]!r}")
    return {k: _convert(item, v, _join(key, k)) for k, v in value.items()}


def _unknown_key(name: Any, valid: list[str], where: str) -> TokensieveError:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    level = f"'{where}'" if where else "the top level"
    return TokensieveError(f"unknown config key '{_join(where, str(name))}'{hint}; "
                           f"valid keys at {level}: {', '.join(valid) or '(none)'}")


def _dataclass(cls: type[T], value: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping; keys it lacks take their defaults."""
    if not isinstance(value, dict):
        raise _wrong_type(where, cls, value)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in value:
        if name not in fields:
            raise _unknown_key(name, list(fields), where)
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], v, _join(where, name)) for name, v in value.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TokensieveError(f"missing config key '{_join(where, name)}' (it has no default)")
    try:
        return cls(**kwargs)
    except TokensieveError as err:
        raise TokensieveError(f"config '{where}': {err}" if where else str(err)) from err


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; errors name the dotted ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        return _union(tp, value, key)
    if origin is Literal:
        return _literal(tp, value, key)
    if tp in (list, tuple) or origin in (list, tuple):
        return _sequence(tp, value, key)
    if tp is dict or origin is dict:
        return _mapping(tp, value, key)
    if tp in (int, float, bool, str):
        return _scalar(tp, value, key)
    raise TokensieveError(f"config key '{key}' has a field type tokensieve cannot read: {_type_name(tp)}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` (nested dataclasses included) from plain ``data``, checking every key and type.

    ``where`` is the dotted key ``data`` sits at, used in error messages.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TokensieveError(f"from_dict needs a dataclass type, got {cls!r}")
    return _dataclass(cls, data, where)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TokensieveError(f"cannot store {value!r} ({type(value).__name__}) in a YAML config")


def to_dict(obj: Any) -> dict:
    """Dataclass instance -> plain dict of YAML-safe values (tuples become lists)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TokensieveError(f"to_dict needs a dataclass instance, got {obj!r}")
    return _plain(obj)


def _set_dotted(data: dict, dotted: str, value: Any, override: str) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted`` ``"a.b.c"``, creating missing (or empty) mappings."""
    *parents, last = dotted.split(".")
    node = data
    for i, part in enumerate(parents):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise TokensieveError(f"override '{override}': '{'.'.join(parents[:i + 1])}' is not a mapping")
    node[last] = value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """A copy of ``data`` with each ``"a.b.c=value"`` set; values are read as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    result = copy.deepcopy(data)
    for override in overrides:
        dotted, sep, text = override.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted or any(not part for part in dotted.split(".")):
            raise TokensieveError(f"malformed override '{override}': expected key.path=value")
        try:
            value = _parse_yaml(text)
        except yaml.YAMLError as err:
            raise TokensieveError(f"override '{override}': the value is not valid YAML ({yaml_problem(err)})") from None
        _set_dotted(result, dotted, value, override)
    return result


def yaml_file(path: str | Path, what: str) -> Any:
    """The value in YAML file ``path`` (None when empty); ``what`` names the file in errors."""
    try:
        return _parse_yaml(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokensieveError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise TokensieveError(f"{what} {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise TokensieveError(f"{what} {path} is not text (not UTF-8), so not YAML") from None
    except OSError as err:
        raise TokensieveError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise TokensieveError(f"{what} {path} is not valid YAML: {yaml_problem(err)}") from None


def _read_yaml(path: Path) -> dict:
    """The mapping in YAML config file ``path``; an empty file is an empty mapping."""
    data = yaml_file(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TokensieveError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Read ``path`` (YAML; ``None`` means all defaults), apply dotted ``overrides``, check it against ``cls``."""
    data = _read_yaml(Path(path)) if path is not None else {}
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except TokensieveError as err:
        if path is None:
            raise
        raise TokensieveError(f"{path}: {err}") from err


def save_config(obj: Any, path: str | Path) -> None:
    """Write dataclass ``obj`` to ``path`` as YAML, atomically and fsynced (:func:`atomic_write_text`)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
