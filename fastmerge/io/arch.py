"""The inputs' architectures (``config.json``'s ``architectures`` and ``model_type``), compared before a
merge: mergekit refuses to mix architectures unless ``--allow-crimes``; so does fastmerge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError


def architecture(root: Path) -> tuple[tuple[str, ...], str | None] | None:
    """(``architectures``, ``model_type``) of the model in folder ``root``; None without a readable config.json."""
    try:
        doc = json.loads((Path(root) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    archs = doc.get("architectures")
    archs = tuple(str(a) for a in archs) if isinstance(archs, list) else ()
    mt = doc.get("model_type")
    return archs, (str(mt) if mt is not None else None)


def _describe(a: tuple[tuple[str, ...], str | None]) -> str:
    archs, mt = a
    return f"{'/'.join(archs) or '(no architectures)'} (model_type {mt})"


def check_architectures(roots: Mapping[str, Path], allow_crimes: bool) -> None:
    """One line naming the first model whose architecture or model_type differs from the first model's,
    unless ``allow_crimes``. Models without a config.json are not compared."""
    if allow_crimes:
        return
    first: tuple[str, tuple[tuple[str, ...], str | None]] | None = None
    for path, root in roots.items():
        a = architecture(root)
        if a is None:
            continue
        if first is None:
            first = (path, a)
            continue
        (p0, a0) = first
        if (a[0] and a0[0] and a[0] != a0[0]) or (a[1] and a0[1] and a[1] != a0[1]):
            raise ConfigError(f"{path}: architecture {_describe(a)} differs from {p0}'s {_describe(a0)}; mergekit "
                              "refuses this too: pass --allow-crimes (allow_crimes=True) to merge them anyway")
