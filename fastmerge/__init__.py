"""fastmerge: fast, streaming, mergekit-compatible model merging.

    fastmerge.merge("config.yml", "out/")                          # checkpoints on disk
    fastmerge.merge_tensors("ties", [a, b], base, weight=0.5, density=0.5)
    fastmerge.merge_state_dicts("linear", [sd1, sd2], weight=[0.3, 0.7])

``import fastmerge`` does not import torch (1.2-1.7 s of start-up on the reference machine): modules on
the merge path read it through ``fastmerge._lazy``, so the command line's native fast path never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

# Imported here (none of them imports torch at import time). ``plan`` must be bound after the
# submodule ``fastmerge.plan`` was imported (api imports it), or the module would shadow the function.
from .api import merge, merge_state_dicts, merge_tensors, plan  # noqa: E402
from .config import MergeConfig  # noqa: E402
from .errors import FastMergeError  # noqa: E402

_LAZY = {"MergeReport": ".engine.session"}

if TYPE_CHECKING:
    from .engine.session import MergeReport


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["merge", "plan", "merge_tensors", "merge_state_dicts", "MergeConfig", "MergeReport", "FastMergeError", "__version__"]
