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

from ._common import (
    OUT_CODES, HostPack, Segments, make_tiles, merge_block, numels, out_arg, persistent_grid, prepare_launch, seg_tables,
    store_full, store_rounded,
)
from .gta import MASK_ALL, GtaKernel, _row, weight_rows


@triton.jit
def _linear_tile(
    x_ptr, sx_t, base_ptr, out_ptr, start, seg, seg_start, seg_end, w_ptr, wb_ptr, div_ptr,
    T: tl.constexpr, BASE: tl.constexpr, NORMALIZE: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr,
    FULL: tl.constexpr,
):
    ar = tl.arange(0, BLOCK)
    if FULL:
        valid = ar < BLOCK
    else:
        offs = start + ar.to(tl.int64)
        valid = (offs >= seg_start) & (offs < seg_end)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if BASE != 0:
        b = _row(base_ptr + start, ar, valid, FULL)
    if BASE == 1:
        acc = tl.fma(b, tl.load(wb_ptr + seg), acc)
    for t in tl.static_range(T):
        x = _row(x_ptr + t * sx_t + start, ar, valid, FULL)
        if BASE == 3:
            x = x - b
        acc = tl.fma(x, tl.load(w_ptr + seg * T + t), acc)
    if BASE == 2:
        acc = tl.fma(b, tl.load(wb_ptr + seg), acc)
    if NORMALIZE:
        acc = tl.div_rn(acc, tl.load(div_ptr + seg))
    if BASE == 3:
        acc = acc + b
    if FULL:
        store_full(out_ptr + start + ar, acc, OUT)
    else:
        store_rounded(out_ptr + start + ar, acc, valid, OUT)


@triton.jit
def _linear_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, out_ptr, tile_seg_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr, n_tiles,
    w_ptr, wb_ptr, div_ptr,
    T: tl.constexpr, BASE: tl.constexpr, NORMALIZE: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """acc = fma(row, w, acc) over the rows in order; BASE 0: no base | 1: the base is the first row
    (weight wb) | 2: the last row | 3: rows are x_t − base and the base is added at the end.
    Persistent over an aligned tile table, as ``gta._gta_kernel``: full tiles unmasked."""
    for p in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        seg = tl.load(tile_seg_ptr + p)
        start = tl.multiple_of(tl.load(tile_start_ptr + p), BLOCK)  # a multiple of BLOCK by construction
        seg_start = tl.load(seg_start_ptr + seg)
        seg_end = tl.load(seg_end_ptr + seg)
        if (start >= seg_start) & (start + BLOCK <= seg_end):
            _linear_tile(x_ptr, sx_t, base_ptr, out_ptr, start, seg, seg_start, seg_end, w_ptr, wb_ptr, div_ptr,
                         T, BASE, NORMALIZE, OUT, BLOCK, True)
        else:
            _linear_tile(x_ptr, sx_t, base_ptr, out_ptr, start, seg, seg_start, seg_end, w_ptr, wb_ptr, div_ptr,
                         T, BASE, NORMALIZE, OUT, BLOCK, False)


def combine(
    x: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor, segs: Segments, weight: torch.Tensor,
    *, base_mode: int = 0, base_weight: torch.Tensor | None = None, div: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """out = Σ_t w_t·row_t with one fused multiply-add per row (``_linear_kernel``); per-segment tables
    ``weight`` fp32 [S, T], ``base_weight`` fp32 [S], ``div`` fp32 [S] (None: no division)."""
    if x.dim() != 2 or x.stride(1) != 1 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError("kernels: x must be [T, N] with contiguous rows, out a contiguous [N]")
    if base_mode != 0 and (base is None or base.dim() != 1 or not base.is_contiguous()):
        raise ValueError("kernels: base_mode needs a contiguous [N] base")
    # bounds: every segment inside the rows, the base and the output (an internal caller error would
    # otherwise read or write out of bounds on a GPU)
    reach = min(x.shape[1], out.numel(), base.numel() if base_mode != 0 else x.shape[1])
    if segs.total > reach:
        raise ValueError(f"kernels: segments reach element {segs.total}, the rows/base/output hold {reach}")
    T = x.shape[0]
    if tuple(weight.shape) != (segs.count, T):
        raise ValueError(f"kernels: weight must be [S, T] = [{segs.count}, {T}], got {list(weight.shape)}")
    BLOCK, warps = merge_block(T + (base_mode != 0), block)
    tiles = make_tiles(segs, BLOCK, x.device, aligned=True)
    if tiles.count == 0:
        return out
    start, end, _ = seg_tables(segs, x.device)
    dummy = torch.zeros(1, dtype=torch.float32, device=x.device)
    _linear_kernel[(persistent_grid(tiles.count, x.device),)](
        x, x.stride(0), dummy if base is None else base, out_arg(out), tiles.seg, tiles.start, start, end, tiles.count,
        weight.contiguous(), dummy if base_weight is None else base_weight.contiguous(),
        dummy if div is None else div.contiguous(),
        T=T, BASE=base_mode, NORMALIZE=div is not None, OUT=OUT_CODES[out.dtype], BLOCK=tiles.block, num_warps=warps,
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
        self.T = len(params[0].weight) if params else 0
        # host tables; ``prepare`` copies them with the launches' tables in one asynchronous copy
        self.weight = torch.tensor(weight_rows(list(params)), dtype=torch.float32)
        self.div = torch.tensor([weight_divisor(p.weight, True) if p.normalize else 1.0 for p in params], dtype=torch.float32)
        self._prepared = False
        self._launch: dict[tuple, torch.Tensor] = {}

    def prepare(self, launches=()) -> None:
        """``GtaKernel.prepare``: the weights and every launch's tables in ONE asynchronous copy."""
        pack = HostPack(self.device)
        first = not self._prepared
        if first:
            iw, idv = pack.add(self.weight), pack.add(self.div)
        dones, keys = [], []
        for segs, groups in launches:
            key = (segs, None if groups is None else tuple(int(i) for i in groups))
            if key not in self._launch:
                keys.append((key, pack.add(list(range(segs.count)) if groups is None else list(key[1]), torch.int64)))
                dones.append(prepare_launch(pack, segs, [(merge_block(self.T)[0], True)]))
        views = pack.upload()
        if first:
            self.weight, self.div, self._prepared = views[iw], views[idv], True
        for key, i in keys:
            self._launch[key] = views[i]
        for done in dones:
            done(views)

    def data_pass(self, *a, **k) -> None:
        raise AssertionError("linear has no data pass")

    def end_pass(self, j: int) -> None:
        raise AssertionError("linear has no data pass")

    def merge(self, x: torch.Tensor, base, out: torch.Tensor, segs: Segments, groups=None, block: int | None = None):
        key = (segs, None if groups is None else tuple(int(i) for i in groups))
        if key not in self._launch:
            self.prepare([(segs, groups)])
        g = self._launch[key]
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
