"""safetensors tensors as numpy arrays, without torch: what ``extract`` reads and writes.

``import torch`` costs 1.9 s on the 2-core reference machine, 40 % of a whole ``fastmerge extract-lora`` of the
168M benchmark family, and numpy reads, converts and writes everything extraction needs:

- reading: each input file mapped read-only once (``np.memmap``); a tensor is a view of its bytes. bf16 is
  widened to fp32 exactly by moving its 16 bits into the high half of a uint32 (``left_shift`` straight into
  the fp32 buffer's bits, one pass); f16 and f32 convert natively (f16 signalling NaNs quieted, as torch's).
- writing fp32 results as bf16: round to nearest even on the bits, ``(x + 0x7FFF + lsb) >> 16``, as torch's
  ``.to(torch.bfloat16)`` does (overflow rounds to ±inf; NaN becomes 0xFFFF, the NaN ATen's vectorized
  conversion writes); f16 by numpy's cast (IEEE round to nearest even, as torch's; NaNs quieted as the F16C
  instruction does). Tested bit for bit against torch in ``tests/lora/test_st_numpy.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..io.index import TensorInfo

#: the dtypes extraction computes from, as numpy reads their bytes (bf16: its bits)
NP_BITS = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
#: safetensors' names of the dtypes written
ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: promote_types of two input dtypes, as torch's: bf16 with f16 meet in f32
_PROMOTE_ORDER = {"bfloat16": 1, "float16": 1, "float32": 2}


def promote(a: str, b: str) -> str:
    """torch.promote_types for the three float dtypes, by name."""
    if a == b:
        return a
    return "float32" if _PROMOTE_ORDER[a] == _PROMOTE_ORDER[b] else max(a, b, key=_PROMOTE_ORDER.__getitem__)


class Reader:
    """Tensors of checkpoint files as read-only numpy views of one mapping per file (shared by threads)."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap] = {}
        self._lock = threading.Lock()

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's values (bf16: uint16 bits) shaped as ``info.shape``, a view of the mapped file."""
        with self._lock:
            m = self._maps.get(info.file)
            if m is None:
                try:
                    m = self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{info.file}: cannot map the file ({e})") from None
        if info.end > len(m):
            raise CheckpointError(f"{info.file}: tensor '{info.name}' lies past the end of the file")
        return m[info.begin:info.end].view(NP_BITS[info.dtype]).reshape(info.shape)

    def f32_into(self, info: TensorInfo, out: np.ndarray) -> None:
        """Write the tensor's values into the fp32 array ``out`` (its shape; any strides)."""
        to_f32(self.raw(info), info.dtype, out)

    def f32(self, info: TensorInfo) -> np.ndarray:
        out = np.empty(info.shape, dtype=np.float32)
        self.f32_into(info, out)
        return out

    def close(self) -> None:
        with self._lock:
            self._maps.clear()  # the maps close when their last view goes


def to_f32(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """``raw`` (``NP_BITS[dtype]``) as fp32 into ``out``: bf16 exactly by its bits in the high half."""
    if dtype == "bfloat16":
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        return
    np.copyto(out, raw, casting="safe")
    if dtype == "float16":
        nan = np.isnan(out)
        if nan.any():  # signalling NaNs quieted, as the F16C conversion torch uses does (numpy keeps them)
            bits = out.view(np.uint32)
            bits[nan] |= np.uint32(0x400000)


def from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 ``x`` as ``dtype``'s values (bf16: uint16 bits), rounded as torch's ``.to(dtype)``."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # beyond 65504 rounds to ±inf, as in torch, which does not warn
            out = bits.view(np.float32).astype(np.float16).view(np.uint16)
        nan = np.isnan(x)
        if nan.any():  # quieted, payload's top bits kept, as the F16C conversion torch uses (numpy keeps sNaNs)
            b = bits[nan]
            out[nan] = (((b >> 16) & 0x8000) | 0x7E00 | ((b >> 13) & 0x3FF)).astype(np.uint16)
        return out.view(np.float16)
    lsb = (bits >> 16) & 1
    out = ((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)  # NaN bits may wrap: replaced next
    out[np.isnan(x)] = 0xFFFF
    return out


def as_bytes(x: np.ndarray) -> Any:
    """The array's bytes, C order, without a copy where it is contiguous."""
    return memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
