"""Gram matrices on the GPU for the geometric methods (slerp, model_stock): one read of the rows.

``fastmerge.methods.sphere.gram`` is the specification: per segment, ⟨v_i, v_j⟩ for the T rows v_i
(x_i, or x_i − base), products in fp32 for 16-bit inputs and in fp64 for fp32 inputs (x − b is exact
in fp32 for 16-bit inputs), summed per tile (2048 elements) and then per segment in fp64 in a fixed
order. The reference sums 512 Ki-element blocks with torch's own order, so the Gram entries agree to
~1e-7 relative (16-bit) / ~1e-15 (fp32); the coefficients derived from them agree far below an
output ulp, and the combined outputs agree bit for bit except for rare ties of the final rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Segments, default_block, make_tiles, seg_tables, table
from .gta import segment_sums


class GramPlan:
    """What slerp's and model_stock's kernel plans share: the Gram matrices of G tensors summed over a
    launch's segments (a batch, or row chunks) ON THE DEVICE, and each launch's group indices copied once
    (one asynchronous copy each, reused by the merge). Nothing is read back: the coefficients are torch
    ops on device tensors, so no unit waits for the GPU (tests/engine/test_gpu.py counts)."""

    def __init__(self, G: int, device) -> None:
        self.G, self.device = G, device
        self.g: torch.Tensor | None = None
        self._launch: dict[tuple, torch.Tensor] = {}

    def groups(self, segs: Segments, groups) -> torch.Tensor:
        """Device int64 group indices of a launch (segment s belongs to tensor ``groups[s]``; default s)."""
        key = (segs.count, None if groups is None else tuple(int(i) for i in groups))
        if key not in self._launch:
            if groups is None:
                self._launch[key] = torch.arange(segs.count, dtype=torch.int64, device=self.device)  # made there
            else:
                self._launch[key] = table(list(key[1]), torch.int64, self.device)
        return self._launch[key]

    def add_gram(self, part: torch.Tensor, segs: Segments, groups) -> None:
        """Add a launch's per-segment Gram matrices [S, R, R] (fp64, on the device) to their tensors'."""
        if self.g is None:
            self.g = torch.zeros((self.G, *part.shape[1:]), dtype=torch.float64, device=part.device)
        self.g.index_add_(0, self.groups(segs, groups), part)  # each group at most once per launch: deterministic


@triton.jit
def part_offset(p, R, i, j):
    """Element (i, j) of tile p's R×R block of partial sums. ``p`` must be int64 (the kernel casts its
    program id): P·R² reaches 2^31 at ~2.2 M tiles with R = 31 (a 4.7 G-element stacked embedding at
    BLOCK 2048); ``tests/kernels/test_triton_bounds.py`` runs this function on int32 and int64 inputs."""
    return p * R * R + i * R + j


@triton.jit
def _gram_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, part_ptr, tile_seg_ptr, tile_start_ptr, seg_end_ptr, R,
    BASE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """part[p, i·R + j] = Σ over tile p of v_i·v_j (i ≤ j; the rest stays 0). BASE 0: v_i = x_i;
    1: v_i = x_i − base; 2: v_0 = base, v_i = x_(i−1) (R = T + 1)."""
    p = tl.program_id(0).to(tl.int64)  # int64: p·R² passes 2^31 on a stacked embedding (4.7 G elements, R ≥ 31)
    seg = tl.load(tile_seg_ptr + p)
    offs = tl.load(tile_start_ptr + p) + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < tl.load(seg_end_ptr + seg)
    if BASE != 0:
        b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    for i in range(R):
        if BASE == 2:
            if i == 0:
                vi = b
            else:
                vi = tl.load(x_ptr + (i - 1) * sx_t + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            vi = tl.load(x_ptr + i * sx_t + offs, mask=valid, other=0.0).to(tl.float32)
            if BASE == 1:
                vi = vi - b
        if F64:
            vi = vi.to(tl.float64)
        for j in range(i, R):
            if BASE == 2:
                vj = tl.load(x_ptr + (j - 1) * sx_t + offs, mask=valid & (j > 0), other=0.0).to(tl.float32)
                if j == 0:
                    vj = b
            else:
                vj = tl.load(x_ptr + j * sx_t + offs, mask=valid, other=0.0).to(tl.float32)
                if BASE == 1:
                    vj = vj - b
            if F64:
                vj = vj.to(tl.float64)
            tl.store(part_ptr + part_offset(p, R, i, j), tl.sum(vi * vj, 0).to(tl.float64))


def gram(x: torch.Tensor, base: torch.Tensor | None, segs: Segments, *, base_mode: int = 0, f64: bool | None = None,
         block: int | None = None) -> torch.Tensor:
    """fp64 [S, R, R] (symmetric): the Gram matrix of each segment's vectors: the rows of ``x`` [T, N]
    (base_mode 0), minus ``base`` (1), or ``base`` followed by the rows (2, R = T + 1). ``f64``: fp64
    products (default: for fp32 rows, as the reference)."""
    T = x.shape[0]
    R = T + 1 if base_mode == 2 else T
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("kernels: x must be [T, N] with contiguous rows")
    reach = min(x.shape[1], base.numel() if base is not None and base_mode != 0 else x.shape[1])
    if segs.total > reach:
        raise ValueError(f"kernels: segments reach element {segs.total}, the rows/base hold {reach}")
    f64 = (x.dtype == torch.float32) if f64 is None else f64
    BLOCK, warps = default_block(block)
    tiles = make_tiles(segs, BLOCK, x.device)
    part = torch.zeros((tiles.count, R * R), dtype=torch.float64, device=x.device)
    _, end, _ = seg_tables(segs, x.device)
    if tiles.count:
        _gram_kernel[(tiles.count,)](
            x, x.stride(0), x if base is None else base, part, tiles.seg, tiles.start, end, R,
            BASE=base_mode, F64=f64, BLOCK=tiles.block, num_warps=warps, enable_fp_fusion=False,
        )
    g = segment_sums(part, tiles, segs).view(segs.count, R, R)
    return torch.triu(g) + torch.triu(g, 1).transpose(1, 2)
