"""A warning when a merge *makes* inf or NaN: an output tensor with non-finite values whose inputs are
all finite (a parameter that overflows, a zero weight sum, a kernel bug). Checked on the writer thread,
overlapped with the merge of the next tensor, from the output bytes (no torch: the torch-free native path
has memoryviews): a value is non-finite where its exponent bits are all ones. Only an output that has
some reads its inputs back (from their files) to tell "the merge made them" from "they came in". One
warning per merge, naming the first such tensor; after it nothing more is checked."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

#: dtype -> (unsigned integer of its width, exponent mask); numpy is imported only by the fallback below
#: (its import, ~0.1 s, would land inside the torch-free path's merge time)
_EXP = {"bfloat16": ("uint16", 0x7F80), "float16": ("uint16", 0x7C00), "float32": ("uint32", 0x7F800000)}
#: elements per pass (bounds the scratch: 2 x 1 MiB of uint16 + 0.5 MiB bool)
CHUNK = 1 << 19


def nonfinite(buf: Any, dtype: str) -> bool:
    """Whether the raw little-endian ``dtype`` values in ``buf`` (bytes-like) hold an inf or a NaN."""
    import numpy as np

    it, mask = _EXP[dtype]
    it = np.dtype(it).type
    a = np.frombuffer(buf, dtype=it)
    n = min(a.size, CHUNK)
    tmp = np.empty(n, dtype=it)
    hit = np.empty(n, dtype=bool)
    m = it(mask)
    for i in range(0, a.size, CHUNK):
        c = a[i:i + CHUNK]
        k = c.size
        np.bitwise_and(c, m, out=tmp[:k])
        np.equal(tmp[:k], m, out=hit[:k])
        if hit[:k].any():
            return True
    return False


def _output_nonfinite(view: Any, dtype: str) -> bool:
    """``nonfinite`` of an output tensor (a CPU torch tensor, or a writable memoryview of the torch-free
    path's buffers): in one C++ pass when ``_C`` is loaded (~10x cheaper than numpy's passes, which slowed
    memory-bound merges: the writer thread shares 2 cores with the kernels), else with numpy."""
    from .. import _native

    if _native.HAS_CPU_EXT:
        if isinstance(view, memoryview):
            if not view.readonly and view.contiguous:
                import ctypes

                from ..io.index import ITEMSIZE
                from ..io.reader import RawView

                raw = view.cast("B")
                if raw.nbytes == 0:
                    return False
                addr = ctypes.addressof(ctypes.c_char.from_buffer(raw))
                return _native.any_nonfinite(RawView(addr, raw.nbytes, dtype, raw.nbytes // ITEMSIZE[dtype]))
        elif view.is_contiguous():
            return _native.any_nonfinite(view)
    if not isinstance(view, memoryview):
        from .._lazy import torch

        view = memoryview(view.contiguous().reshape(-1).view(torch.uint8).numpy())
    return nonfinite(view.cast("B"), dtype)


def _file_nonfinite(file: Path, begin: int, nbytes: int, dtype: str) -> bool:
    step = CHUNK * {"uint16": 2, "uint32": 4}[_EXP[dtype][0]]
    with open(file, "rb") as f:
        f.seek(begin)
        left = nbytes
        while left > 0:
            b = f.read(min(step, left))
            if not b:
                return False
            if nonfinite(b, dtype):
                return True
            left -= len(b)
    return False


class NonFiniteWatch:
    """``check(name, view)`` for each tensor written (a CPU torch tensor or a memoryview of the planned bytes)."""

    def __init__(self, plan: Any):
        self._plan = plan
        self._by_name: dict[str, Any] | None = None
        self.done = False  # warned once: nothing more is checked

    def _tensor(self, name: str) -> Any:
        if self._by_name is None:
            self._by_name = {t.name: t for t in self._plan.tensors}
        return self._by_name.get(name)

    def check(self, name: str, view: Any) -> None:
        if self.done:
            return
        tp = self._tensor(name)
        if tp is None or tp.out_dtype not in _EXP:
            return
        if not isinstance(view, memoryview) and str(view.dtype).removeprefix("torch.") != tp.out_dtype:
            return
        if not _output_nonfinite(view, tp.out_dtype):
            return
        inputs = ([tp.base] if tp.base is not None else []) + list(tp.sources)
        if any(x.dtype in _EXP and _file_nonfinite(x.file, x.begin, x.nbytes, x.dtype) for x in inputs):
            return  # inf/NaN came in with an input: not the merge's doing
        self.done = True
        warnings.warn(f"tensor '{name}': the merged values include inf or NaN although its inputs are all finite "
                      f"(merge_method {self._plan.method.name}: check its parameters); only the first such tensor "
                      "is reported", RuntimeWarning, stacklevel=1)
