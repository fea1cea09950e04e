"""NuSLERP: SLERP of two models (or of their task vectors) with weights, flattened or per row / column.

Paper: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242 (NuSLERP itself is mergekit's variant; it has no paper)

With weights w₁, w₂ of the two non-base models:

    t = w₂ / (w₁ + w₂)          (t = 0.5 when |w₁ + w₂| < 1e-6)
    v₁, v₂ = x₁ − base, x₂ − base   with a base model;   x₁, x₂ without
    vectors: the whole flattened tensor (``nuslerp_flatten: true``, the default), else each slice along
             the last dimension (rows of a 2-D weight), or along dimension 0 (``nuslerp_row_wise: true``:
             the columns of a 2-D weight)
    û = v / max(‖v‖, 1e-7),  c = clamp(⟨û₁, û₂⟩, −1, 1)
    1 − c² ≤ 1e-16:  r = (1 − t)·v₁ + t·v₂                                   (collinear: lerp)
    otherwise:       θ = acos(c),  r = (sin((1 − t)θ)·v₁ + sin(tθ)·v₂) / sin θ
    out = base + r   (out = r without a base)

As in SLERP, the angle comes from the unit vectors and the RAW vectors are interpolated.

Numerics: mergekit 0.1.5 computes all of this in the compute dtype (bf16 rounds after every
operation, the norm and dot reductions included, then the elementwise formula); ``mergekit_compat``
does the same operations in the same dtype. Default mode evaluates the same formula as
out = base + c₁·v₁ + c₂·v₂ per vector: the norms and the dot product from an fp64 Gram matrix, the
coefficients in fp64, then one fp32 pass (``sphere.gram`` / ``sphere.combine``), rounded once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, ParamContext, ParamSpec
from .sphere import combine, from_rows, gram, to_rows

#: lower bound of a norm before dividing by it (mergekit's value)
NORM_CLAMP = 1e-7
#: vectors count as collinear when sin²θ = 1 − cos²θ ≤ COLINEAR_EPS² (mergekit's value)
COLINEAR_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class NuslerpParams:
    weight: tuple[float, ...]
    flatten: bool = True
    row_wise: bool = False


def nuslerp_t(weight: Sequence[float]) -> float:
    """t from the two weights, in float64 like mergekit (Python ``sum``)."""
    total = sum(weight)
    return 0.5 if abs(total) < 1e-6 else weight[1] / total


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """SLERP of v0 → v1 at t, in the tensors' dtype, over the chosen vectors."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_CLAMP)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_CLAMP)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # the unselected branch stays finite
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


class Nuslerp(MergeMethod):
    name = "nuslerp"
    paper_url = "https://doi.org/10.1145/325165.325242"
    base_policy = "optional"
    tensor_free_params = True
    params = (
        ParamSpec("weight", float, REQUIRED, per_model=True, doc="relative weight; t = w2 / (w1 + w2)"),
        ParamSpec("nuslerp_flatten", bool, True, per_model=False, doc="SLERP the whole flattened tensor"),
        ParamSpec("nuslerp_row_wise", bool, False, per_model=False, doc="without flatten: vectors along dim 0 instead of the last dim"),
    )
    params_type = NuslerpParams
    min_models = 2
    max_models = 2

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> NuslerpParams:
        return NuslerpParams(
            weight=tuple(per_model["weight"]), flatten=shared["nuslerp_flatten"], row_wise=shared["nuslerp_row_wise"]
        )

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: NuslerpParams, compat: bool = False
    ) -> torch.Tensor:
        if len(inputs) != 2:
            raise ConfigError(f"nuslerp: needs exactly two models besides the base, got {len(inputs)}")
        t = nuslerp_t(params.weight)
        x0, x1 = inputs
        if compat:
            if base is None:
                return nuslerp_vectors(t, x0, x1, params.flatten, params.row_wise)
            return base + nuslerp_vectors(t, x0 - base, x1 - base, params.flatten, params.row_wise)
        # default: the same formula, coefficients from the fp64 Gram matrix, one fp32 pass (see sphere.py)
        shape, f, rw = x0.shape, params.flatten, params.row_wise
        vs = [to_rows(x, f, rw) for x in (x0, x1)]
        b = None if base is None else to_rows(base, f, rw)
        g = gram(vs, b)
        n0 = g[:, 0, 0].sqrt().clamp(min=NORM_CLAMP)
        n1 = g[:, 1, 1].sqrt().clamp(min=NORM_CLAMP)
        cos = (g[:, 0, 1] / (n0 * n1)).clamp(-1, 1)
        colinear = (1 - cos.square()) <= COLINEAR_EPS**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        sin_theta = torch.sin(theta)
        c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
        return from_rows(combine(vs, torch.stack([c0, c1], dim=1), b), shape, f, rw)
