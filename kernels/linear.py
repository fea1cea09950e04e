"""linear and task_arithmetic on the GPU: one pass, T rows read once, one row written.

``fastmerge.methods.linear`` / ``task_arithmetic`` are the specifications:

    linear:           acc = fma(x_t, w_t, acc) in model order (torch's ``addcmul_``: one rounding per
                      model), then acc / Σw (IEEE division) when normalize
    task_arithmetic:  the fused ``gta`` pass with no mask and no consensus: acc = acc + w_t·(x_t − base),
                      / Σw, · λ, + base

Both are pure streaming: the floor is (T [+1])·in + out bytes at copy bandwidth.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fastmerge.methods.linear import LinearParams, weight_divisor
from fastmerge.methods.task_arithmetic import TaskArithmeticParams

from ._common import OUT_CODES, Segments, default_block, make_tiles, numels, out_arg, seg_tables, store_rounded
from .gta import MASK_ALL, GtaKernel, weight_rows


@triton.jit
def _linear_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, out_ptr, tile_seg_ptr, tile_start_ptr, seg_end_ptr, w_ptr, wb_ptr, div_ptr, T,
    BASE: tl.constexpr, NORMALIZE: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """acc = fma(row, w, acc) over the rows in order; BASE 0: no base | 1: the base is the first row
    (weight wb) | 2: the last row | 3: rows are x_t − base and the base is added at the end."""
    p = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + p)
    offs = tl.load(tile_start_ptr + p) + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < tl.load(seg_end_ptr + seg)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if BASE != 0:
        b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if BASE == 1:
        acc = tl.fma(b, tl.load(wb_ptr + seg), acc)
    for t in range(T):
        x = tl.load(x_ptr + t * sx_t + offs, mask=valid, other=0.0).to(tl.float32)
        if BASE == 3:
            x = x - b
        acc = tl.fma(x, tl.load(w_ptr + seg * T + t), acc)
    if BASE == 2:
        acc = tl.fma(b, tl.load(wb_ptr + seg), acc)
    if NORMALIZE:
        acc = tl.div_rn(acc, tl.load(div_ptr + seg))
    if BASE == 3:
        acc = acc + b
    store_rounded(out_ptr + offs, acc, valid, OUT)


def combine(
    x: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor, segs: Segments, weight: torch.Tensor,
    *, base_mode: int = 0, base_weight: torch.Tensor | None = None, div: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """out = Σ_t w_t·row_t with one fused multiply-add per row (``_linear_kernel``); per-segment tables
    ``weight`` fp32 [S, T], ``base_weight`` fp32 [S], ``div`` fp32 [S] (None: no division)."""
    if x.dim() != 2 or x.stride(1) != 1 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError("kernels: x must be [T, N] with contiguous rows, out a contiguous [N]")
    BLOCK, warps = default_block(block)
    tiles = make_tiles(segs, BLOCK, x.device)
    if tiles.count == 0:
        return out
    _, end, _ = seg_tables(segs, x.device)
    dummy = torch.zeros(1, dtype=torch.float32, device=x.device)
    _linear_kernel[(tiles.count,)](
        x, x.stride(0), dummy if base is None else base, out_arg(out), tiles.seg, tiles.start, end,
        weight.contiguous(), dummy if base_weight is None else base_weight.contiguous(),
        dummy if div is None else div.contiguous(), x.shape[0],
        BASE=base_mode, NORMALIZE=div is not None, OUT=OUT_CODES[out.dtype], BLOCK=tiles.block, num_warps=warps,
        enable_fp_fusion=False,
    )
    return out


def batch_key(p: LinearParams) -> tuple:
    return ("linear", p.normalize)


class LinearKernel:
    """Same driver interface as ``gta.GtaKernel`` (no data passes; ``base`` ignored)."""

    n_passes = 0

    @staticmethod
    def key(method, p: LinearParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return batch_key(p)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "LinearKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``)."""
        return cls(params, numels(shapes), device)

    def __init__(self, params: Sequence[LinearParams], numels: Sequence[int], device) -> None:
        keys = {batch_key(p) for p in params}
        if len(keys) != 1:
            raise ValueError(f"linear kernel: one launch needs one normalize, got {keys}")
        self.device = device
        self.normalize = params[0].normalize
        self.weight = torch.tensor(weight_rows(list(params)), dtype=torch.float32).to(device)
        self.div = torch.tensor(
            [weight_divisor(p.weight, True) if p.normalize else 1.0 for p in params], dtype=torch.float32
        ).to(device)

    def data_pass(self, *a, **k) -> None:
        raise AssertionError("linear has no data pass")

    def end_pass(self, j: int) -> None:
        raise AssertionError("linear has no data pass")

    def merge(self, x: torch.Tensor, base, out: torch.Tensor, segs: Segments, groups=None, block: int | None = None):
        g = torch.tensor(list(groups) if groups is not None else range(segs.count), dtype=torch.int64, device=self.device)
        return combine(x, None, out, segs, self.weight[g], div=self.div[g] if self.normalize else None, block=block)

    def run(self, x, base, out, segs, block: int | None = None):
        return self.merge(x, base, out, segs, block=block)


def ta_batch_key(p: TaskArithmeticParams) -> tuple:
    return ("task_arithmetic", p.normalize)


class TaskArithmeticKernel(GtaKernel):
    @staticmethod
    def key(method, p: TaskArithmeticParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return ta_batch_key(p)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "TaskArithmeticKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``)."""
        return cls(params, numels(shapes), device)

    def __init__(self, params: Sequence[TaskArithmeticParams], numels: Sequence[int], device) -> None:
        keys = {ta_batch_key(p) for p in params}
        if len(keys) != 1:
            raise ValueError(f"task_arithmetic kernel: one launch needs one normalize, got {keys}")
        # the reference divides by Σw as is (its check() rejects 0), unlike the sparsifying methods' guard
        div = [weight_divisor(p.weight, True) if p.normalize else 1.0 for p in params]
        super().__init__(weight_rows(list(params)), [p.lambda_ for p in params], div, device)
        self.normalize = params[0].normalize
        self.mask.kind = MASK_ALL
        self._finish_init()


def linear_merge(x, out, segs: Segments, params: Sequence[LinearParams], block: int | None = None):
    """Merge a packed batch (segment s = one whole tensor with ``params[s]``); no base."""
    return LinearKernel(params, segs.numel, x.device).run(x, None, out, segs, block=block)


def task_arithmetic_merge(x, base, out, segs: Segments, params: Sequence[TaskArithmeticParams], block: int | None = None):
    """Merge a packed batch (segment s = one whole tensor with ``params[s]``)."""
    return TaskArithmeticKernel(params, segs.numel, x.device).run(x, base, out, segs, block=block)
