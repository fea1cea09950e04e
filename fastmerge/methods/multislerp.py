"""Multi-SLERP: a weighted spherical barycentre of any number of models (or of their task vectors).

Reference: Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (no
arXiv paper; the idea is the spherical average of Buss & Fillmore, "Spherical averages and applications
to spherical splines and interpolation", ACM TOG 2001, https://doi.org/10.1145/502122.502124)

Per output tensor, each input flattened to a vector v_i (v_i = x_i − base when a base is given):

    w    = w / Σw                                   (normalize_weights: true, the default)
    n_i  = ‖v_i‖,   u_i = v_i / (n_i + eps)         (onto the unit sphere)
    m    = Σ w_i·u_i;  |m| < eps → lerp Σ w_i·v_i for two models, an error for more
    m̂    = m / |m|                                  (the tangent point)
    τ    = Σ w_i·(u_i − ⟨u_i, m̂⟩·m̂)                (weighted mean in the tangent space at m̂)
    r    = m̂·cos(|τ| + eps) + τ·sin(|τ| + eps)/(|τ| + eps)      (exponential map back to the sphere)
    out  = r · Σ w_i·n_i  (+ base)

One model: out = that model, unchanged (also with a base).

τ is exactly 0 in real arithmetic: Σ w_i⟨u_i, m̂⟩ = ⟨m, m̂⟩ = |m|, so τ = m − |m|·m̂ = 0, and then
r = m̂·cos(eps) = m̂ (cos 1e-8 is 1 in fp64). The result is the normalised weighted mean direction scaled
by the weighted mean norm: out = m̂ · Σ w_i n_i (+ base).

Numerics: mergekit 0.1.5 evaluates every step above in the compute dtype (bf16 rounds after every
operation, the weights too), so its τ is rounding noise that shows in its output (about one ulp of the
unit vectors); ``mergekit_compat`` does the same operations in the same dtype. Default mode evaluates
out = m̂ · Σ w_i n_i directly: norms and |m| from an fp64 Gram matrix, the coefficients of
out = base + Σ c_i v_i in fp64, one fp32 pass (``sphere.gram`` / ``sphere.combine``), one rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, ParamContext, ParamSpec, as_fp32
from .sphere import combine, gram


@dataclasses.dataclass(frozen=True)
class MultislerpParams:
    weight: tuple[float, ...]
    normalize_weights: bool = True
    eps: float = 1e-8


class Multislerp(MergeMethod):
    name = "multislerp"
    paper_url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    base_policy = "optional"
    tensor_free_params = True
    params = (
        ParamSpec("weight", float, REQUIRED, per_model=True, doc="weight of the model in the spherical mean"),
        ParamSpec("normalize_weights", bool, True, per_model=False, doc="divide the weights by their sum"),
        ParamSpec("eps", float, 1e-8, per_model=False, doc="added to norms before dividing by them"),
    )
    params_type = MultislerpParams
    min_models = 1

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> MultislerpParams:
        return MultislerpParams(
            weight=tuple(per_model["weight"]), normalize_weights=shared["normalize_weights"], eps=shared["eps"]
        )

    def check(self, params: MultislerpParams, where: str) -> None:
        # mergekit divides by the sum anyway and writes inf/NaN tensors; refuse instead
        if params.normalize_weights and len(params.weight) > 1 and sum(params.weight) == 0:
            raise ConfigError(f"{where}: weights sum to 0 with normalize_weights: true (division by zero)")

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: MultislerpParams, compat: bool = False
    ) -> torch.Tensor:
        if not inputs:
            raise ConfigError("multislerp: needs at least one model besides the base")
        if len(inputs) == 1:
            return inputs[0] if compat else as_fp32(inputs[0])  # mergekit returns the single input as is
        if compat:
            return _mergekit(inputs, base, params)
        # default: m̂·Σ w_i n_i (τ = 0, see above), from the fp64 Gram matrix and one fp32 pass (sphere.py)
        eps = params.eps
        vs = [x.reshape(1, -1) for x in inputs]
        b = None if base is None else base.reshape(1, -1)
        g = gram(vs, b)[0]
        w = torch.tensor(params.weight, dtype=torch.float64)
        if params.normalize_weights:
            w = w / w.sum()
        norms = g.diagonal().sqrt()
        a = w / (norms + eps)  # m = Σ a_i v_i
        m_norm = (a[:, None] * g * a[None, :]).sum().clamp(min=0).sqrt()  # |Σ a_i v_i|, no BLAS call
        if m_norm < eps:
            _antipodal_check(len(inputs))
            coef = w  # two antipodal models: mergekit lerps
        else:
            coef = a * ((w * norms).sum() / m_norm)
        return combine(vs, coef[None], b).reshape(inputs[0].shape)


def _antipodal_check(n: int) -> None:
    if n != 2:
        raise ConfigError(
            "multislerp: the weighted mean of the unit vectors is 0 (antipodal models whose weights cancel); "
            "use different weights"
        )


def _mergekit(inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: MultislerpParams) -> torch.Tensor:
    """mergekit 0.1.5's evaluation, in the inputs' dtype."""
    eps = params.eps
    vs = torch.stack(list(inputs))
    if base is not None:
        vs.sub_(base)
    flat = vs.view(len(inputs), -1)
    w = torch.tensor(params.weight, dtype=vs.dtype, device=vs.device)
    if params.normalize_weights:
        w = w / w.sum()
    wcol = w.view(-1, 1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * wcol).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        _antipodal_check(len(inputs))
        out = (vs[0] * w[0] + vs[1] * w[1]).view(vs.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    del units
    tau = (tangents * wcol).sum(0)
    del tangents
    tau_norm = torch.norm(tau) + eps
    out = mean * torch.cos(tau_norm) + tau * (torch.sin(tau_norm) / tau_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(vs.shape[1:])
    return out if base is None else out + base
