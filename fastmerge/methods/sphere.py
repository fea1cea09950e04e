"""Shared maths of the geometric methods' default mode: Gram matrices in fp64, one-pass combinations.

Every geometric method (slerp, nuslerp, multislerp, karcher, model_stock) returns a point of the span of
its input vectors v_i (the models, or their task vectors x_i − base), plus the base:

    out = base + Σ_i c_i·v_i

and its coefficients c_i depend on the inputs only through their inner products ⟨v_i, v_j⟩ (norms,
cosines, angles; the Karcher iteration too, since every iterate stays in the span). So the default mode
of those methods is two passes over the data, whatever the method:

1. ``gram``: the T×T Gram matrix of the vectors (one per row for the per-row variants), accumulated
   in float64 over blocks computed in fp64 (fp32 for 16-bit inputs, where that is exact enough);
2. small float64 maths on it (the method: angles, t, the iteration...);
3. ``combine``: out = base + Σ c_i·v_i in fp32, block by block (one product, then one fused
   multiply-add per further model), rounded once to the output dtype by the engine.

Nothing of size numel is ever held in a wider dtype (blocks of GRAM_BLOCK elements), and the per-block work is
a few vectorised torch calls; mergekit's versions make 10-20 full-size passes (karcher: ~4·N per
iteration), each rounding in the compute dtype.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .._lazy import torch

#: elements per block of the two passes. Small enough for a block of T fp32 vectors to stay in L2/L3
#: between its operations, large enough that a 4M-element tensor is only 8 blocks: every torch call is
#: an OpenMP parallel region, and on an oversubscribed machine each one can wait a scheduler time slice
#: for its second thread (2^17-element blocks, ~600 regions per tensor, measured 2-7 s stalls on the busy
#: 2-core box). Measured on a 4096x1024 bf16 tensor, one thread, model_stock / nuslerp / slerp:
#: 2^17 (gram) + 2^18 (combine) → 20.0 / 14.0 / 10.8 ms; 2^19 → 17.4 / 12.1 / 9.2 ms; 2^20 → 22.2 / 14.3 / 9.2 ms.
GRAM_BLOCK = 1 << 19
BLOCK = 1 << 19


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


def max_block(r: int, n: int, size: int = BLOCK) -> int:
    """The largest number of elements in a block of ``blocks(r, n, size)``."""
    if r == 0 or n == 0:
        return 0
    return min(n, size) if r == 1 else min(r, max(1, size // n)) * n


def gram(vs: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """[R, T, T] float64 (on the CPU): per row r, ⟨v_i[r], v_j[r]⟩ with v_i = vs[i] − base (or vs[i]).
    ``vs`` and ``base``: [R, n] (any float dtype)."""
    r, n = vs[0].shape
    t = len(vs)
    dev = vs[0].device
    g = torch.zeros(r, t, t, dtype=torch.float64, device=dev)
    size = max_block(r, n, GRAM_BLOCK)
    # 16-bit inputs: fp32 blocks are enough (x − b is exact in fp32, each product rounds at 2^-24 without
    # bias, torch's cascade sum of a block adds ~1e-7 relative; blocks add up in fp64): the coefficients
    # then err by ~1e-7 relative, far below a 16-bit ulp, at half the cost of fp64 blocks (measured per
    # 128 Ki block: 24 µs per dot product instead of 47). fp32 inputs: fp64 blocks.
    low = all(v.dtype in (torch.bfloat16, torch.float16) for v in (*vs, *([] if base is None else [base])))
    work = torch.float32 if low else torch.float64
    # scratch allocated once: a fresh CPU tensor of ≥ 128 KiB is a new mmap, paid again in page faults
    buf = torch.empty(t, size, dtype=work, device=dev)
    prod = torch.empty(size, dtype=work, device=dev)
    for rs, cs in blocks(r, n, GRAM_BLOCK):
        rows = len(range(*rs.indices(r)))
        cols = len(range(*cs.indices(n)))
        c = buf[:, : rows * cols].view(t, rows, cols)
        p = prod[: rows * cols].view(rows, cols)
        for i, v in enumerate(vs):
            c[i].copy_(v[rs, cs])  # exact upcast
        if base is not None:
            c.sub_(base[rs, cs])  # exact unless the exponents of x and base differ by more than 16 (fp32) / 29
        # T(T+1)/2 products summed by torch, not BLAS (c @ cᵀ or ddot): MKL's threaded gemm / dot stall
        # for ~16 ms per call when the 2 cores are busy (measured: a 4M-element nuslerp took 3.6 s)
        for i in range(t):
            for j in range(i, t):
                d = torch.mul(c[i], c[j], out=p).sum(dim=-1)
                g[rs, i, j] += d
                if j != i:
                    g[rs, j, i] += d
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
    scratch = None if base is None else torch.empty(max_block(r, n), dtype=torch.float32, device=dev)
    for rs, cs in blocks(r, n):
        b = None if base is None else base[rs, cs]
        acc = out[rs, cs]  # a view: the block is accumulated in place
        for i, v in enumerate(vs):
            if b is None:
                d = v[rs, cs]  # 16-bit blocks are read as they are and computed in fp32 (``ci`` is fp32)
            else:
                d = torch.sub(v[rs, cs], b, out=scratch[: acc.numel()].view(acc.shape))  # x − b in fp32
            ci = cf[rs, i : i + 1]  # [rows, 1]: a dimensioned fp32 tensor, so 16-bit inputs compute in fp32
            if i == 0:
                torch.mul(d, ci, out=acc)
            else:
                acc.addcmul_(d, ci)  # fused: one rounding per further model
        if b is not None:
            acc.add_(b)
    return out
