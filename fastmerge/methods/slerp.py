"""SLERP: spherical linear interpolation between the base model and one other model, per tensor.

Paper: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242 (no arXiv version; mergekit cites https://en.wikipedia.org/wiki/Slerp)

Per output tensor, both tensors flattened to vectors a (base) and b (the other model):

    â = a / ‖a‖,  b̂ = b / ‖b‖          (a norm ≤ 1e-8 is replaced by 1)
    d = clamp(⟨â, b̂⟩, −1, 1)
    |d| > 0.9995:  out = (1 − t)·a + t·b                                  (nearly collinear: lerp)
    otherwise:     θ = acos(d),  out = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

The angle comes from the normalised directions, but the RAW tensors are interpolated (so norms are
interpolated too, not forced to 1). t = 0 gives the base, t = 1 the other model; t outside [0, 1]
extrapolates (mergekit accepts it).

Numerics: mergekit 0.1.5 computes in fp32 (the inputs are upcast, whatever the compute dtype), with
the reductions done over chunks of 2^20 elements: each chunk's norm, then the norm of the chunk norms,
and the dot product as a sum of per-chunk sums of (x/‖a‖)·(y/‖b‖); then ``ca·a + cb·b`` with two
fp32 products and a sum, stored in the compute dtype. ``mergekit_compat`` makes the same calls on the
same shapes (bit-identical coefficients and result). Default mode takes the norms and the dot product
from an fp64 Gram matrix, the coefficients in fp64, then one fp32 pass with a fused multiply-add
(``sphere.gram`` / ``sphere.combine``): fewer passes over the data and exact coefficients. mergekit's
fp32 sums put a relative error of several 1e-6 in its coefficients on million-element tensors
(measured, 1.1M elements: its fp32 outputs 5.5e-6 relative off the fp64 result, fastmerge's 1e-7;
0.2% of the bf16 outputs differ by 1 ulp); on the small test tensors bf16 outputs agree on 99.995%.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, ParamContext, ParamSpec, TritonKernel
from .sphere import combine, gram

#: mergekit 0.1.5 reduces over chunks of this many elements (per output); the chunk boundaries decide
#: the summation order of the norms and the dot product, so they are part of the arithmetic.
CHUNK = 1 << 20
#: |cos θ| above which the two directions count as collinear and plain lerp is used.
DOT_THRESHOLD = 0.9995
#: a norm at or below this is replaced by 1 (a zero tensor has no direction).
NORM_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class SlerpParams:
    t: float


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit 0.1.5's (ca, cb), [1, 1] tensors such that slerp(a, b, t) = ca·a + cb·b, in its working
    dtype (fp32; fp64 for fp64 inputs). ``a``, ``b``: [1, n], upcast one 2^20-element chunk at a time."""
    n = a.shape[1]
    starts = range(0, n, CHUNK)
    work = torch.float64 if a.dtype == torch.float64 else torch.float32  # mergekit: fp64 stays fp64

    def norm(v: torch.Tensor) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(v[:, s : s + CHUNK].to(work), dim=1, keepdim=True) for s in starts]
        total = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(total > NORM_EPS, total, 1)

    na, nb = norm(a), norm(b)
    dots = [
        ((a[:, s : s + CHUNK].to(work) / na) * (b[:, s : s + CHUNK].to(work) / nb)).sum(dim=1, keepdim=True)
        for s in starts
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    tt = torch.full((1, 1), t, dtype=work, device=a.device)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))  # the unselected branch stays finite
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return ca, cb


class Slerp(MergeMethod):
    name = "slerp"
    triton = TritonKernel("slerp:SlerpKernel")
    paper_url = "https://doi.org/10.1145/325165.325242"
    base_policy = "required"
    tensor_free_params = True
    params = (ParamSpec("t", float, REQUIRED, per_model=False, doc="interpolation factor: 0 = base, 1 = the other model"),)
    params_type = SlerpParams
    min_models = 1
    max_models = 1

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> SlerpParams:
        return SlerpParams(t=shared["t"])

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: SlerpParams, compat: bool = False
    ) -> torch.Tensor:
        if base is None or len(inputs) != 1:
            raise ConfigError(f"slerp: needs a base and exactly one other model, got {len(inputs)} other model(s)")
        a, b = base.reshape(1, -1), inputs[0].reshape(1, -1)
        if compat:
            if a.shape[1] == 0:
                return base.clone()
            ca, cb = slerp_coefficients(a, b, params.t)
            out = torch.empty_like(a)  # the compute dtype, filled chunk by chunk as mergekit does
            for s in range(0, a.shape[1], CHUNK):
                # ca·a and cb·b rounded separately, then the sum, then to the compute dtype: mergekit's order
                out[:, s : s + CHUNK] = ca * a[:, s : s + CHUNK].to(ca.dtype) + cb * b[:, s : s + CHUNK].to(ca.dtype)
            return out.reshape(base.shape)
        # default: the same coefficients from the fp64 Gram matrix, one fp32 pass (see sphere.py)
        g = gram([a, b])[0]
        na, nb = (torch.where(n > NORM_EPS, n, 1) for n in g.diagonal().sqrt())
        dot = (g[0, 1] / (na * nb)).clamp(-1, 1)
        t = torch.tensor(params.t, dtype=torch.float64)
        if dot.abs() > DOT_THRESHOLD:
            coef = torch.stack([1 - t, t])
        else:
            theta = torch.acos(dot)
            coef = torch.stack([torch.sin((1 - t) * theta), torch.sin(t * theta)]) / torch.sin(theta)
        return combine([a, b], coef[None]).reshape(base.shape)
