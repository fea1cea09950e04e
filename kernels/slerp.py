"""SLERP on the GPU: a Gram pass (norms and the dot product), fp64 coefficients, one combine pass.

``fastmerge.methods.slerp`` (default mode) is the specification: ca, cb from the fp64 Gram matrix of
(base, model), then out = ca·base + cb·model with one product and one fused multiply-add, rounded
once. Two reads of the two rows; the reference's torch path makes the same two passes, so the gain
is the fused combine and, on many small tensors, one launch per batch instead of ~20 per tensor.
``mergekit_compat`` (2^20-element chunked fp32 sums) stays on the torch backend.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastmerge.methods.slerp import DOT_THRESHOLD, NORM_EPS, SlerpParams

from ._common import Segments, numels, table
from .linear import combine
from .sphere import GramPlan, gram


def coefficients(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[S, 2] fp64 (ca, cb) from the Gram matrices g [S, 2, 2] of (base, model), as the reference."""
    na = g[:, 0, 0].sqrt()
    nb = g[:, 1, 1].sqrt()
    na = torch.where(na > NORM_EPS, na, torch.ones_like(na))
    nb = torch.where(nb > NORM_EPS, nb, torch.ones_like(nb))
    dot = (g[:, 0, 1] / (na * nb)).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.where(linear, torch.ones_like(sin_theta), sin_theta))
    cb = torch.where(linear, t, torch.sin(t * theta) / torch.where(linear, torch.ones_like(sin_theta), sin_theta))
    return torch.stack([ca, cb], dim=1)


class SlerpKernel(GramPlan):
    """Driver interface of ``gta.GtaKernel``: one data pass (the Gram matrix), then the combine. The Gram
    matrices and the coefficients stay on the device (``GramPlan``)."""

    @staticmethod
    def key(method, p: SlerpParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return ("slerp",)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "SlerpKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``)."""
        return cls(params, numels(shapes), device)

    def __init__(self, params: Sequence[SlerpParams], numels: Sequence[int], device) -> None:
        super().__init__(len(params), device)
        self.t = table([p.t for p in params], torch.float64, device)  # one asynchronous copy
        self.passes = ["gram"]
        self.coef: torch.Tensor | None = None

    n_passes = 1

    def data_pass(self, j: int, x, base, segs: Segments, groups=None, block: int | None = None) -> None:
        if x.shape[0] != 1:
            raise ValueError("slerp kernel: exactly one model besides the base")
        f64 = x.dtype == torch.float32 and base.dtype == torch.float32
        self.add_gram(gram(x, base, segs, base_mode=2, f64=f64, block=block), segs, groups)

    def end_pass(self, j: int) -> None:
        self.coef = coefficients(self.g, self.t).to(torch.float32)  # on the device: nothing read back

    def merge(self, x, base, out, segs: Segments, groups=None, block: int | None = None):
        c = self.coef[self.groups(segs, groups)]
        # ca·base first (a product: fma with 0), then fma(model, cb, ·): the reference's mul + addcmul_
        return combine(x, base, out, segs, c[:, 1:].contiguous(), base_mode=1, base_weight=c[:, 0].contiguous(), block=block)

    def run(self, x, base, out, segs: Segments, block: int | None = None):
        self.data_pass(0, x, base, segs, block=block)
        self.end_pass(0)
        return self.merge(x, base, out, segs, block=block)
