"""Shared maths of the geometric methods' default mode: Gram matrices in fp64, one-pass combinations.

Every geometric method (slerp, nuslerp, multislerp, karcher, model_stock) returns a point of the span of
its input vectors v_i (the models, or their task vectors x_i − base), plus the base:

    out = base + Σ_i c_i·v_i

and its coefficients c_i depend on the inputs only through their inner products ⟨v_i, v_j⟩ (norms,
cosines, angles; the Karcher iteration too, since every iterate stays in the span). So the default mode
of those methods is two passes over the data, whatever the method:

1. ``gram``: the T×T Gram matrix of the vectors (one per row for the per-row variants), accumulated
   in float64 from exactly upcast blocks (bf16/fp16/fp32 products and differences are exact in fp64);
2. small float64 maths on it (the method: angles, t, the iteration...);
3. ``combine``: out = base + Σ c_i·v_i in fp32, block by block (v_i = x_i − base is exact in fp32 for
   bf16/fp16 inputs; one product, then one fused multiply-add per further model, then + base).

Nothing of size numel is ever held in float64, and the work per block is a few vectorised torch calls
(blocks of 2^20 elements bound the scratch memory and keep it in cache).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .base import as_fp32

#: elements per block of the Gram pass: the T fp64 rows of a block (3 MiB for T = 3) stay in cache
#: between the upcast and the product. Measured on a 4M-element bf16 tensor, 2 task vectors, one thread:
#: 2^14 → 12.3 ms, 2^16 → 8.4 ms, 2^17 → 6.9 ms; whole-tensor fp64 copies (2^22) → ~28 ms.
GRAM_BLOCK = 1 << 17
#: elements per block of the combination pass (fp32 accumulator of 1 MiB)
BLOCK = 1 << 18


def to_rows(x: torch.Tensor, flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """A 2-D [R, n] view whose rows are the vectors: the whole tensor (flatten), the slices along the last
    dimension (default), or along dimension 0 (``row_wise``, mergekit's ``transpose(0, -1)``)."""
    if flatten or x.dim() < 2:
        return x.reshape(1, -1)
    if row_wise:
        x = x.transpose(0, -1)
    return x.reshape(-1, x.shape[-1])


def from_rows(rows: torch.Tensor, shape: torch.Size, flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """Inverse of ``to_rows`` for a result computed on the rows."""
    if flatten or len(shape) < 2 or not row_wise:
        return rows.reshape(shape)
    tshape = list(shape)
    tshape[0], tshape[-1] = tshape[-1], tshape[0]
    return rows.reshape(tshape).transpose(0, -1)


def blocks(r: int, n: int, size: int = BLOCK) -> Iterator[tuple[slice, slice]]:
    """(rows, columns) slices of ~``size`` elements covering an [r, n] matrix (a whole number of rows when
    there are several, column ranges of the single row otherwise)."""
    if r == 0 or n == 0:
        return
    if r == 1:
        for s in range(0, n, size):
            yield slice(0, 1), slice(s, s + size)
        return
    step = max(1, size // n)
    for s in range(0, r, step):
        yield slice(s, s + step), slice(0, n)


def gram(vs: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """[R, T, T] float64 (on the CPU): per row r, ⟨v_i[r], v_j[r]⟩ with v_i = vs[i] − base (or vs[i]).
    ``vs`` and ``base``: [R, n] (any float dtype)."""
    r, n = vs[0].shape
    t = len(vs)
    dev = vs[0].device
    g = torch.zeros(r, t, t, dtype=torch.float64, device=dev)
    buf = torch.empty(t, min(GRAM_BLOCK, r * n), dtype=torch.float64, device=dev)
    for rs, cs in blocks(r, n, GRAM_BLOCK):
        rows = len(range(*rs.indices(r)))
        cols = len(range(*cs.indices(n)))
        c = buf[:, : rows * cols].view(t, rows, cols)
        for i, v in enumerate(vs):
            c[i].copy_(v[rs, cs])  # exact upcast
        if base is not None:
            c.sub_(base[rs, cs])  # exact: a difference of two bf16/fp16/fp32 values fits in fp64
        if r == 1:
            g[0].addmm_(c[:, 0], c[:, 0].T)
        else:
            g[rs] += torch.einsum("trk,srk->rts", c, c)
    return g.cpu()


def combine(vs: Sequence[torch.Tensor], coef: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """[R, n] fp32: base + Σ_i coef[:, i]·(vs[i] − base) (or Σ_i coef[:, i]·vs[i]). ``coef``: [R, T].

    fp32 inputs: the differences are formed (x − b rounds once; the sum then rounds at the scale of the
    task vectors, not of the weights). 16-bit inputs: (1 − Σc)·b + Σ c_i·x_i, read in their dtype
    (no upcast copies, no subtraction pass): its roundings are at the fp32 scale of the weights, 2^-16
    of a bf16 ulp, invisible after the final rounding except for a rare 1-ulp tie flip."""
    r, n = vs[0].shape
    dev = vs[0].device
    out = torch.empty(r, n, dtype=torch.float32, device=dev)
    direct = base is not None and all(x.dtype in (torch.bfloat16, torch.float16) for x in (*vs, base))
    if direct:
        coef = torch.cat([coef, 1 - coef.sum(dim=1, keepdim=True)], dim=1)  # fp64: the base's coefficient
        vs, base = [*vs, base], None
    cf = coef.to(device=dev, dtype=torch.float32)
    for rs, cs in blocks(r, n):
        b = None if base is None else base[rs, cs]
        acc = out[rs, cs]  # a view: the block is accumulated in place
        for i, v in enumerate(vs):
            d = v[rs, cs] if direct else _fp32_delta(v[rs, cs], b)
            ci = cf[rs, i : i + 1]  # [rows, 1]: a dimensioned fp32 tensor, so 16-bit inputs compute in fp32
            if i == 0:
                torch.mul(d, ci, out=acc)
            else:
                acc.addcmul_(d, ci)  # fused: one rounding per further model
        if b is not None:
            acc.add_(b)
    return out


def _fp32_delta(v: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """v − b (or v) in fp32."""
    if v.dtype != torch.float32:
        d = v.float()
        return d if b is None else d.sub_(b)
    return v if b is None else v - b
