"""The layers of docs/architecture.md, held against the code's own imports.

Every ``tokensieve`` import is read from the source (function-local ones included), so a
module that reaches a layer above it, an import cycle, or a file grown past 350 lines fails
here with the names to look at.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "tokensieve"
MAX_LINES = 350

# Bottom to top, as drawn in docs/architecture.md: a module imports from its own layer or below.
LAYERS = [
    ("foundation", {"errors", "ops", "held_warnings", "interrupt", "cli_args", "devices", "checkpoint", "config",
                    "optional", "distributed", "version"}),
    ("contract", {"method", "learned"}),
    ("methods", {"methods"}),
    ("backbones", {"backbones", "attach"}),
    ("pruner", {"pruner"}),
    ("data", {"data"}),
    ("evaluate", {"evaluate"}),
    ("train", {"train"}),
    ("testbeds", {"testbed", "clip"}),
    ("integrations", {"integrations"}),
    ("apps", {"ask", "demo", "cli", "commands", "__main__"}),
]
LEAVES = {"testbed"}  # the embedded testbed: imported by the apps layer only


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The tokensieve modules ``path`` imports anywhere in its body (``from a import b`` names
    module ``a.b`` where that is a module, else ``a``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tokensieve"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "tokensieve":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


def layer_of(module: str) -> int | None:
    """The layer index of a module; None for the package face ``tokensieve`` itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for i, (_, members) in enumerate(LAYERS):
        if parts[1] in members:
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS here and to docs/architecture.md")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) & set(known) for name, path in known.items()}


def test_every_module_belongs_to_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for name, targets in graph().items():
        if layer_of(name) is None:
            continue
        for target in sorted(targets):
            if layer_of(target) is None:
                if name.split(".")[1] not in LAYERS[-1][1]:
                    upward.append(f"{name} -> {target} (the package face, for users and the apps: import the module)")
            elif layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_the_testbed_is_a_leaf():
    apps = LAYERS[-1][1]
    wrong = [f"{name} -> {target}" for name, targets in graph().items() for target in sorted(targets)
             if target.split(".")[1:2] and target.split(".")[1] in LEAVES
             and name.split(".")[1:2] and name.split(".")[1] not in apps | {target.split(".")[1]}]
    assert not wrong, "only the apps may import the testbed:\n" + "\n".join(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_source_file_over_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split one job out of it"


def layout_paths() -> set[str]:
    """The paths README.md's layout block names (``a/b.py, c.py``: ``c.py`` is in ``a/`` too)."""
    readme = (SRC.parent / "README.md").read_text()
    block = readme[readme.index("## Layout"):].split("```")[1]
    names = set()
    for line in block.splitlines():
        if not line.startswith("  ") or line.startswith("   "):
            continue  # the root line, and continuation lines of a description
        folder = ""
        for name in line.strip().split("  ")[0].split(", "):
            if "/" in name.rstrip("/"):
                folder = name.rsplit("/", 1)[0] + "/"
            names.add(name if "/" in name.rstrip("/") else folder + name)
    return names


def test_the_readme_layout_matches_the_tree():
    named = layout_paths()
    missing = sorted(n for n in named if not (PACKAGE / n).exists())
    assert not missing, f"README's layout names what is not in src/tokensieve: {missing}"
    entries = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
               if p.name not in ("__init__.py", "__pycache__")}
    top = {n.split("/")[0] + ("/" if "/" in n else "") for n in named}
    assert entries <= top, f"README's layout leaves out {sorted(entries - top)}"
    backbones = {f"backbones/{p.name}" for p in (PACKAGE / "backbones").glob("*.py") if p.name != "__init__.py"}
    assert backbones <= named, f"README's layout leaves out {sorted(backbones - named)}"
