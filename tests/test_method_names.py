"""No method name is tested outside ``fastmerge/methods/``: what a method needs from a backend or an engine
is declared by the method (``MergeMethod.native`` / ``.triton``: ``methods.base.NativeKernel`` /
``TritonKernel``; ``base_as_input``, ``rank_sweep``, ``engine``) and the rest of the package reads those
declarations. A ``name == "ties"`` elsewhere is knowledge of one
method living in a shared file, where the next method's author will not find it.

Read with ``ast`` (no import of the modules): a comparison (``==``, ``!=``, ``in``, ``not in``), a
``.startswith``/``.endswith`` call or a ``match``/``case`` whose constant is a registered method name (for
``startswith``/``endswith``: a prefix/suffix of one, 4 characters at least) is reported as ``file:line``."""

from __future__ import annotations

import ast
from pathlib import Path

from fastmerge.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1] / "fastmerge"
NAMES = frozenset(REGISTRY)


def _strings(node: ast.AST) -> list[str]:
    """The string constants of ``node`` (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _method_names(node: ast.AST) -> list[str]:
    return [s for s in _strings(node) if s in NAMES]


def _prefix_of_a_name(node: ast.AST) -> list[str]:
    # 4 characters at least: ``k.startswith("b")`` (a layer key) is not about breadcrumbs
    return [s for s in _strings(node) if len(s) >= 4 and any(n.startswith(s) or n.endswith(s) for n in NAMES)]


def offences(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)):
                    hit = _method_names(right) + _method_names(node.left)
                    if hit:
                        found.append((node.lineno, f"compares with method name(s) {sorted(set(hit))}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith") and node.args:
                hit = _prefix_of_a_name(node.args[0])
                if hit:
                    found.append((node.lineno, f".{node.func.attr}({sorted(set(hit))}) on a method name"))
        elif isinstance(node, ast.match_case):
            hit = [s for p in ast.walk(node.pattern) if isinstance(p, ast.MatchValue) for s in _method_names(p.value)]
            if hit:
                found.append((node.pattern.lineno, f"case on method name(s) {sorted(set(hit))}"))
    return found


def _files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if (ROOT / "methods") not in p.parents)


def test_the_checker_finds_each_form():
    src = (
        'a == "ties"\n'
        'b in ("x", "dare_linear")\n'
        'c.startswith("della")\n'
        '"cart" != d\n'
        'match e:\n    case "slerp": pass\n'
        'f == "tiesx"\n'
        'g.startswith("head.")\n'
    )
    assert [line for line, _ in offences(ast.parse(src))] == [1, 2, 3, 4, 6]


def test_no_method_name_is_tested_outside_methods():
    bad = []
    for path in _files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bad += [f"{path.relative_to(ROOT.parent)}:{line}: {what}" for line, what in offences(tree)]
    assert not bad, "method names tested outside fastmerge/methods/ (declare it next to the method):\n" + "\n".join(bad)
