"""Triton kernel for M-TIES' per-row trim: the k_r-th largest |x| of every row, k_r varying by row.

One program per row runs a bitwise binary search on the fp32 bit pattern of |x| (non-negative floats
order like their int32 bit patterns): for bit 30 down to 0, keep the bit if at least k_r entries of the
row are ≥ the candidate pattern. After 31 counting passes over the row (from L1/L2: a 4096-wide fp32 row
is 16 KB) the pattern is exactly the k_r-th largest magnitude, ties included: no sort, no Python loop over
rows. The torch path of the same selection (8-bit radix histograms, 4 passes) is
``fastmerge.mloss.mties.row_kth_largest``; both are tested against ``torch.sort``.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import interpreting


@triton.jit
def _row_kth_kernel(x_ptr, k_ptr, out_ptr, C, sx_r, sx_c, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    k = tl.load(k_ptr + r)
    offs0 = tl.arange(0, BLOCK_C).to(tl.int64)
    prefix = tl.zeros((), dtype=tl.int32)
    one = tl.full((), 1, dtype=tl.int32)
    for i in range(31):
        cand = prefix | (one << (30 - i))
        cnt = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + offs0
            m = offs < C
            v = tl.abs(tl.load(x_ptr + r * sx_r + offs * sx_c, mask=m, other=0.0).to(tl.float32))
            bits = v.to(tl.int32, bitcast=True)
            cnt += tl.sum(((bits >= cand) & m).to(tl.int32), axis=0)
        prefix = tl.where(cnt >= k, cand, prefix)
    tl.store(out_ptr + r, prefix.to(tl.float32, bitcast=True))


def row_kth_largest(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """fp32 [R]: the k[r]-th largest |x[r, :]| of a 2-D ``x`` (any float dtype); k in [1, C] (int)."""
    R, C = x.shape
    out = torch.empty(R, dtype=torch.float32, device=x.device)
    if R == 0:
        return out
    kk = k.to(device=x.device, dtype=torch.int32).contiguous()
    block = 128 if interpreting() else min(1024, triton.next_power_of_2(max(C, 16)))
    _row_kth_kernel[(R,)](x, kk, out, C, x.stride(0), x.stride(1), BLOCK_C=block, num_warps=4)
    return out
