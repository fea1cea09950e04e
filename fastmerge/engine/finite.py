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

import numpy as np

#: dtype -> (unsigned integer of its width, exponent mask)
_EXP = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}
#: elements per pass (bounds the scratch: 2 x 1 MiB of uint16 + 0.5 MiB bool)
CHUNK = 1 << 19


def nonfinite(buf: Any, dtype: str) -> bool:
    """Whether the raw little-endian ``dtype`` values in ``buf`` (bytes-like) hold an inf or a NaN."""
    it, mask = _EXP[dtype]
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


def _file_nonfinite(file: Path, begin: int, nbytes: int, dtype: str) -> bool:
    step = CHUNK * np.dtype(_EXP[dtype][0]).itemsize
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
        if not isinstance(view, memoryview):
            if str(view.dtype).removeprefix("torch.") != tp.out_dtype:
                return
            from .._lazy import torch

            view = memoryview(view.contiguous().reshape(-1).view(torch.uint8).numpy())
        if not nonfinite(view.cast("B"), tp.out_dtype):
            return
        inputs = ([tp.base] if tp.base is not None else []) + list(tp.sources)
        if any(x.dtype in _EXP and _file_nonfinite(x.file, x.begin, x.nbytes, x.dtype) for x in inputs):
            return  # inf/NaN came in with an input: not the merge's doing
        self.done = True
        warnings.warn(f"tensor '{name}': the merged values include inf or NaN although its inputs are all finite "
                      f"(merge_method {self._plan.method.name}: check its parameters); only the first such tensor "
                      "is reported", RuntimeWarning, stacklevel=1)
