"""The rooms of the package (docs/design.md, "Architecture"): imports flow one way.

Read from the source with ``ast`` (nothing is imported): every import of a package module, at
module level or inside a function, is an edge of the import graph.  The graph has no cycle; an
edge only goes from a room to the same room or one below it in ROOMS; no module imports the
package root (``from .. import x`` reaching back to ``wsbound_fast/__init__.py``); and package
modules are imported at module level only (optional third-party libraries may be imported
lazily, inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "wsbound_fast"
#: From the top (the user surface) down; a room may import itself and any room after it.
ROOMS = ("_cli", "_api", "_spectral", "_backends", "_engine", "_problem", "_planning")
LEAVES = ("_version", "_core", "_core_avx2")  # modules any room may use


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _edges() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported package module, line, at module level)]"""
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" for a in node.names]  # a module, or a name _resolve trims
                edges += [(t, node.lineno, id(node) in top) for t in targets]
            elif isinstance(node, ast.Import):
                edges += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("wsbound_fast")]
        out[name] = edges
    return out


EDGES = _edges()
MODULES = set(EDGES)


def _resolve(target: str) -> str:
    """The package module an import names (``from ._engine import schedule`` names a module)."""
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_tree_is_the_rooms():
    rooms = {_room(m) for m in MODULES} - {None}
    assert rooms == set(ROOMS) | {"__main__", *LEAVES} - {"_core", "_core_avx2"}


def test_no_cycle():
    graph = {m: {_resolve(t) for t, _, _ in e} & MODULES for m, e in EDGES.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if n == m or n == "wsbound_fast" and m == "wsbound_fast.__main__":
                continue
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _room(m) in ROOMS))
def test_imports_flow_down(module):
    here = ROOMS.index(_room(module))
    for target, line, top in EDGES[module]:
        t = _resolve(target)
        assert t != "wsbound_fast", f"{module}:{line} imports the package root"
        room = _room(t)
        if room in LEAVES:
            continue
        assert room in ROOMS, f"{module}:{line} imports {target}"
        assert ROOMS.index(room) >= here, f"{module}:{line} imports {t}, a room above {_room(module)}"
        assert top, f"{module}:{line} imports {t} inside a function"
