"""``torch``, imported on first use.

``import torch`` costs 1.2-1.7 s on the 2-core reference machine (perf-baselines.md), more than a
whole native ties merge of the 1.3 GB benchmark family. Modules on the merge path (config, plan,
methods, backends) therefore write ``from fastmerge._lazy import torch``: the name resolves to the
real module the first time an attribute is read (a method's ``reference()``, the torch backend),
and the native fast path (``fastmerge.fastpath``) never reads one. Modules using it need
``from __future__ import annotations`` so that ``torch.Tensor`` in signatures is not evaluated.
"""

from __future__ import annotations

import importlib
import sys
import types


class _LazyModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_fm_name"] = name

    def _fm_load(self) -> types.ModuleType:
        mod = importlib.import_module(self.__dict__["_fm_name"])
        self.__dict__["_fm_mod"] = mod
        return mod

    def __getattr__(self, attr: str):
        mod = self.__dict__.get("_fm_mod") or self._fm_load()
        return getattr(mod, attr)

    def __repr__(self) -> str:
        loaded = "loaded" if "_fm_mod" in self.__dict__ else "not loaded yet"
        return f"<lazy module {self.__dict__['_fm_name']!r} ({loaded})>"


def torch_loaded() -> bool:
    """Whether ``torch`` has been imported in this process (the fast path's tests check it stays False)."""
    return "torch" in sys.modules


torch = _LazyModule("torch")


#: the dtype names of plans, configs and checkpoints' headers (``TensorPlan.out_dtype``, ``compute_dtype``,
#: ``io.index.TensorInfo.dtype``): the merge kernels' three float types
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    """The torch dtype named ``name`` (one of ``DTYPE_NAMES``; KeyError otherwise). The one map from
    dtype names to torch dtypes: it imports torch when called."""
    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)
