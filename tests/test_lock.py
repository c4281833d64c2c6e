"""The environment is the locked one: every package tokensieve[test] needs, at its locked version."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from doc_commands import ROOT


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _needed(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Every distribution ``root[extras]`` pulls in, transitively, with its installed version."""
    seen: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            env_ok = [req.marker is None or req.marker.evaluate({"extra": e}) for e in (*wanted, "")]
            if not any(env_ok):
                continue
            key = canonicalize_name(req.name)
            try:
                version = distribution(req.name).version
            except PackageNotFoundError:
                raise AssertionError(f"{name} needs {req.name}, which is not installed") from None
            if key not in seen:
                seen[key] = version
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_every_package_the_project_needs_is_installed_at_its_locked_version():
    locked, needed = _locked(), _needed("tokensieve", ("test",))
    assert len(needed) > 100  # the whole tree, not only pyproject's direct dependencies
    missing = sorted(set(needed) - set(locked))
    assert not missing, f"needed but not in requirements.lock: {missing}; run bash tools/refresh-lock"
    differ = {k: (v, locked[k]) for k, v in needed.items() if v != locked[k]}
    assert not differ, f"installed (left) differs from requirements.lock (right): {differ}"


def test_the_direct_pins_agree_with_the_lock():
    pyproject = (ROOT / "pyproject.toml").read_text()
    locked = _locked()
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', pyproject):
        assert locked[canonicalize_name(name)].split("+")[0] == version, name
