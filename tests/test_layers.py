"""Layers only look down: every import in the package, read with ast (function-level imports included).

The rooms, lowest first (docs/architecture.md):

    io, methods, ops, backends, mloss, kernels, vocab, config, plan     what is read and computed
    engine                                                               how a plan becomes an output folder
    research                                                             the papers' tools and the lab
    api, cli, demo, env, testing                                         the front door

Forbidden: ``io``/``methods`` importing ``engine``/``research``/``api``/``cli``; ``engine`` importing
``research``/``api``/``cli``; and any cycle between modules of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fastmerge

PKG = Path(fastmerge.__file__).resolve().parent
FORBIDDEN = {
    "io": ("engine", "research", "api", "cli"),
    "methods": ("engine", "research", "api", "cli"),
    "engine": ("research", "api", "cli"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports() -> dict[str, set[str]]:
    """module -> the fastmerge modules it imports (``from x import y`` counts ``x.y`` when that is a module)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run: no layering, no cycle
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node)
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            else:
                continue
            for n in names:
                if n == "fastmerge" or n.startswith("fastmerge."):
                    while n not in files and "." in n:  # fastmerge.x.attr -> fastmerge.x
                        n = n.rsplit(".", 1)[0]
                    if n != mod:
                        deps.add(n)
        graph[mod] = deps
    return graph


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_known_imports():
    g = _imports()
    assert "fastmerge.engine.session" in g["fastmerge.engine.stream"]
    assert "fastmerge.engine" in g["fastmerge.api"]  # a function-level import counts
    assert "fastmerge.io.writer" in g["fastmerge.plan"]


def test_layers_only_look_down():
    bad = []
    for mod, deps in _imports().items():
        for d in deps:
            if _room(d) in FORBIDDEN.get(_room(mod), ()):
                bad.append(f"{mod} imports {d}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = _imports()
    # the package __init__ re-exports the front door; a submodule reaching `fastmerge` itself (for
    # __version__) is not a cycle through code, so the root is left out of the graph
    g = {m: {d for d in ds if d != "fastmerge"} for m, ds in g.items() if m != "fastmerge"}
    # a package's __init__ importing its own submodules, and those importing each other, is one room:
    # cycles are looked for between modules
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
