"""The import direction: one way down, core at the bottom.

Reads every module of the package (imports at any depth of a module: top level, inside functions, under
TYPE_CHECKING) and checks which slices each slice may import, and that no two modules import each
other, directly or around a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("daemon", "router", "exporters")

# What each slice may import, besides itself (laas.v1 is the generated protobuf code).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "router": {"core", "client", "v1"},
    "client": {"core", "v1"},
    "daemon": {"core", "router", "client", "v1"},
    "exporters": {"core", "daemon"},
}


# Imports that break the rules today, being removed (issue 14); the list may only shrink: an entry that no
# longer holds fails the test too, so it is struck off as the code moves.
KNOWN_WRONG: set[str] = set()
KNOWN_CIRCLES: set[str] = set()


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in SOURCE_ROOTS:
        for path in sorted((ROOT / root / "laas").rglob("*.py")):
            parts = path.relative_to(ROOT / root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, name: str, known: set[str]) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            subs = [f"{base}.{alias.name}" for alias in node.names]
            # `from package import module` imports the module; `from module import name`, the module.
            yield from (sub for sub in subs if sub in known)
            if not all(sub in known for sub in subs):
                yield base


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = {t for t in imported(path, name, set(mods)) if t.startswith("laas.")}
        edges[name] = {t for t in targets if t in mods and t != name} | {t for t in targets if t.startswith("laas.v1")}
    return edges


def slice_of(module: str) -> str:
    return module.split(".")[1]


def test_each_slice_imports_only_the_slices_below_it() -> None:
    wrong = {
        f"{mod} imports {target}"
        for mod, targets in graph().items()
        for target in targets
        if slice_of(target) != slice_of(mod) and slice_of(target) not in ALLOWED[slice_of(mod)]
    }
    assert not wrong - KNOWN_WRONG, "\n".join(sorted(wrong - KNOWN_WRONG))
    assert not KNOWN_WRONG - wrong, "fixed, strike off KNOWN_WRONG: " + ", ".join(sorted(KNOWN_WRONG - wrong))


def test_no_module_imports_around_a_circle() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    found = {" -> ".join(c) for c in circles}
    assert not found - KNOWN_CIRCLES, "\n".join(sorted(found - KNOWN_CIRCLES))
    assert not KNOWN_CIRCLES - found, "fixed, strike off KNOWN_CIRCLES: " + ", ".join(sorted(KNOWN_CIRCLES - found))


def test_the_checks_see_the_package() -> None:
    mods = modules()
    assert {"laas.core.errors", "laas.core.types", "laas.daemon.server", "laas.router.policy",
            "laas.client.api", "laas.exporters.cli"} <= set(mods)
    assert "laas.core.types" in graph()["laas.core.engine"]
