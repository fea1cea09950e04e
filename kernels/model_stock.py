"""Model Stock on the GPU (``filter_wise: false``): a Gram pass over the task vectors, then one combine.

``fastmerge.methods.model_stock`` (default mode) is the specification: the T×T Gram matrix of
δ_i = x_i − base (one read of base + T models), cos θ and t in fp64 on the device (torch ops: nothing read back), then
out = base + (t/N)·Σ δ_i in one fp32 pass with a fused multiply-add per model — for 16-bit inputs as
(1 − Σc)·base + Σ c_i·x_i, base last, for fp32 inputs on the differences, base added at the end (the
reference's ``sphere.combine``). ``filter_wise: true`` (a ratio per row) and ``mergekit_compat`` stay
on the torch backend.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastmerge.methods.model_stock import ModelStockParams

from ._common import Segments, numels
from .linear import combine
from .sphere import GramPlan, gram


def ratios(g: torch.Tensor) -> torch.Tensor:
    """[S] fp64 t from the task vectors' Gram matrices g [S, N, N], as the reference."""
    n = g.shape[1]
    norms = g.diagonal(dim1=1, dim2=2).sqrt()
    i, j = torch.triu_indices(n, n, offset=1, device=g.device)  # made on the device: no copy
    pair_cos = (g[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
    cos = pair_cos.mean(dim=1)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))


def is_direct(dtypes: Sequence[torch.dtype], base_dtype: torch.dtype) -> bool:
    """The reference's 16-bit combine form (``methods.sphere.combine``): every input 16-bit."""
    return all(d in (torch.bfloat16, torch.float16) for d in (*dtypes, base_dtype))


class ModelStockKernel(GramPlan):
    """Driver interface of ``gta.GtaKernel``: one data pass (the Gram matrix), then the combine. The Gram
    matrices and the coefficients stay on the device (``GramPlan``)."""

    n_passes = 1

    @staticmethod
    def key(method, p: ModelStockParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return ("model_stock",)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "ModelStockKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``): the 16-bit combine form
        where the original dtypes are known."""
        direct = is_direct(in_dtypes, base_dtype) if base_dtype is not None else None
        return cls(params, numels(shapes), device, direct)

    def __init__(self, params: Sequence[ModelStockParams], numels: Sequence[int], device, direct: bool | None = None) -> None:
        """``direct``: combine as (1 − Σc)·base + Σ c_i·x_i (the reference does so when every input is
        16-bit; default: decided from the packed rows' dtype)."""
        if any(p.filter_wise for p in params):
            raise ValueError("model_stock kernel: filter_wise runs on the torch backend")
        super().__init__(len(params), device)
        self.direct = direct
        self.coef: torch.Tensor | None = None

    def data_pass(self, j: int, x, base, segs: Segments, groups=None, block: int | None = None) -> None:
        if x.shape[0] < 2:
            raise ValueError("model_stock kernel: at least two models besides the base")
        f64 = x.dtype == torch.float32 or base.dtype == torch.float32
        self.add_gram(gram(x, base, segs, base_mode=1, f64=f64, block=block), segs, groups)

    def end_pass(self, j: int) -> None:
        n = self.g.shape[1]
        c = (ratios(self.g) / n)[:, None].expand(-1, n)  # fp64 [G, N], on the device: nothing read back
        self.coef = torch.cat([c, 1 - c.sum(dim=1, keepdim=True)], dim=1).to(torch.float32)

    def merge(self, x, base, out, segs: Segments, groups=None, block: int | None = None):
        c = self.coef[self.groups(segs, groups)]
        T = x.shape[0]
        direct = self.direct if self.direct is not None else (x.dtype != torch.float32 and base.dtype != torch.float32)
        if direct:
            return combine(x, base, out, segs, c[:, :T].contiguous(), base_mode=2, base_weight=c[:, T].contiguous(), block=block)
        return combine(x, base, out, segs, c[:, :T].contiguous(), base_mode=3, block=block)

    def run(self, x, base, out, segs: Segments, block: int | None = None):
        self.data_pass(0, x, base, segs, block=block)
        self.end_pass(0)
        return self.merge(x, base, out, segs, block=block)
