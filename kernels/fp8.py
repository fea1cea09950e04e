"""FP8 dequantisation on the device: FP8 bytes and their fp32 scales in, the merge pass's input rows out.

``fastmerge.io.fp8.dequantize`` is the specification: ``fp32(b) · scale`` per element, one fp32 multiply, the
scale one per 128x128 block (``W_scale_inv``, the last block of each dimension partial), per row, per tensor
or none. The byte is decoded with integer operations from its bit layout (e4m3fn: 4 exponent bits, bias 7, no
inf, 0x7F/0xFF NaN; e5m2: 5 exponent bits, bias 15, inf and NaNs), NaN payloads as torch writes them (sign |
0x7fc00000 | mantissa at the top), so the result is bit-identical to the reference on every byte, and the
kernel needs no FP8 support in the hardware or in Triton's interpreter. The GPU engine uploads the FP8 bytes
(a quarter of the fp32 bytes) and dequantises into the unit's input slot: no fp32 copy on the host.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import triton
import triton.language as tl

#: scale kinds and formats, as ``io.fp8.Dequant.kind`` and the FP8 dtype names
KINDS = {"none": 0, "tensor": 1, "channel": 2, "block": 3}
FORMATS = {"float8_e4m3fn": 0, "float8_e5m2": 1}
BLOCK = 1024


#: per format: mantissa bits, the all-ones exponent, the exponent bias, 2^(1 − bias − mantissa bits)
_LAYOUT = {0: (3, 15, 7, 2.0 ** -9), 1: (2, 31, 15, 2.0 ** -16)}


@triton.jit
def _fp8_to_f32(b, FMT: tl.constexpr, MB: tl.constexpr, EMAX: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr):
    """The fp32 value of each byte (``b`` uint32 in [0, 255])."""
    sign = (b & 0x80) << 24
    e = (b >> MB) & EMAX
    m = b & ((1 << MB) - 1)
    normal = sign | ((e + (127 - BIAS)) << 23) | (m << (23 - MB))
    # subnormal m · 2^(1 − BIAS − MB): exact in fp32 (m has at most 3 bits)
    sub_f = m.to(tl.float32) * SUB
    sub = sub_f.to(tl.uint32, bitcast=True) | sign
    bits = tl.where(e == 0, sub, normal)
    nan = sign | 0x7FC00000 | (m << (23 - MB))
    if FMT == 0:
        bits = tl.where((e == EMAX) & (m == 7), nan, bits)
    else:
        bits = tl.where(e == EMAX, tl.where(m == 0, sign | 0x7F800000, nan), bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, n, first, cols, scale_cols, bm, bn, KIND: tl.constexpr, FMT: tl.constexpr,
                    MB: tl.constexpr, EMAX: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = fp32(q[j]) · scale(first + j) for j < n; ``first``: the flat index of q[0] in its tensor (a row
    chunk's offset), which places the scales."""
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < n
    b = tl.load(q_ptr + j, mask=valid, other=0).to(tl.uint32)
    x = _fp8_to_f32(b, FMT, MB, EMAX, BIAS, SUB)
    if KIND == 1:
        x = x * tl.load(s_ptr)
    elif KIND >= 2:
        i = first + j
        r = i // cols
        if KIND == 2:
            s = tl.load(s_ptr + r, mask=valid, other=1.0)
        else:
            c = i - r * cols
            s = tl.load(s_ptr + (r // bm) * scale_cols + c // bn, mask=valid, other=1.0)
        x = x * s
    tl.store(out_ptr + j, x.to(out_ptr.dtype.element_ty), mask=valid)


def dequantize_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, kind: str, fmt: str,
                    shape: tuple[int, ...], block: tuple[int, int] | None = None, first: int = 0) -> torch.Tensor:
    """``out`` (flat, on q's device; fp32 for the reference's bits) = the dequantisation of the FP8 bytes ``q``
    (flat, elements ``first .. first + q.numel()`` of a tensor of ``shape``) with fp32 ``scale`` of ``kind``."""
    n = q.numel()
    if out.numel() != n:
        raise ValueError(f"out: {out.numel()} elements for {n} FP8 bytes")
    if n == 0:
        return out
    k = KINDS[kind] if scale is not None else 0
    rows = shape[0] if shape else 1
    cols = max(1, math.prod(shape) // rows) if rows else 1
    bm, bn = block if (k == 3 and block is not None) else (1, 1)
    s = scale.reshape(-1) if scale is not None else q  # unread when k == 0
    if k and s.dtype != torch.float32:
        raise TypeError(f"scale: fp32 expected, got {s.dtype}")
    f = FORMATS[fmt]
    mb, emax, bias, sub = _LAYOUT[f]
    grid = (triton.cdiv(n, BLOCK),)
    _dequant_kernel[grid](q.reshape(-1).view(torch.uint8), s, out, n, first, cols, -(-cols // bn), bm, bn,
                          KIND=k, FMT=f, MB=mb, EMAX=emax, BIAS=bias, SUB=sub, BLOCK=BLOCK)
    return out



class Fp8Piece:
    """One FP8 input of a GPU unit (``fastmerge.engine.gpu``): the mapped FP8 bytes of the tensor (flat) and how
    its scales apply (an ``io.fp8.Dequant``). ``write`` uploads a range of the bytes as they are and dequantises
    it on the device into the unit's input row: a quarter of the fp32 bytes cross the bus, no host fp32 copy."""

    def __init__(self, q: torch.Tensor, d: Any) -> None:
        self.q = q.reshape(-1)
        self.d = d
        self._scale: torch.Tensor | None = None

    def reshape(self, *shape: int) -> "Fp8Piece":
        return self  # already flat: the engine flattens every source of a unit

    def numel(self) -> int:
        return self.q.numel()

    def write(self, out: torch.Tensor, first: int, count: int, upload: Any = None) -> None:
        """``out`` (count elements on the device) = elements ``first .. first + count`` dequantised. ``upload``
        (host uint8 -> device uint8) carries the bytes (the GPU engine's pinned staging, asynchronous); without
        it, a plain ``.to(device)``."""
        from fastmerge.io.lora import read_tensor

        d = self.d
        q = self.q[first:first + count].view(torch.uint8)
        q = upload(q) if upload is not None else q.to(out.device)
        s = None
        if d.scale is not None and d.kind != "none":
            if self._scale is None or self._scale.device != out.device:
                self._scale = read_tensor(d.scale).to(device=out.device, dtype=torch.float32).contiguous()
            s = self._scale
        dequantize_into(out, q, s, d.kind if s is not None else "none", d.weight.dtype, tuple(d.weight.shape),
                        d.block, first)


def pieces(transform: Any, tensors: Sequence[Any]) -> list[Any]:
    """The inputs of a tensor with an ``io.fp8.Fp8Transform`` as the GPU engine uploads them: FP8 ones as
    ``Fp8Piece``s, the others as they are (base first, as the engines pass them)."""
    return [x if d is None else Fp8Piece(x, d) for x, d in zip(tensors, transform.inputs)]
