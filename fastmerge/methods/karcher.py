"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit sphere.

Paper: Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 1977,
https://doi.org/10.1002/cpa.3160300502 (mergekit cites https://arxiv.org/abs/2603.04972)

Per output tensor, with the N inputs x_i (the base model is not special: mergekit ignores it) and
equal weights α_i = 1/N (mergekit has no ``weight`` parameter for karcher):

    n_i = ‖x_i‖,  u_i = x_i / n_i                          (models with n_i ≤ tol are left out of the mean;
                                                           the α of the others renormalised to sum 1)
    μ   = Σ α_i u_i / ‖Σ α_i u_i‖                          (start; the first unit vector if that norm < tol)
    repeat max_iter times:
        θ_i = acos(clamp(⟨μ, u_i⟩, −1, 1))
        g   = Σ_{θ_i ≥ tol} α_i · θ_i/sin θ_i · (u_i − cos θ_i·μ)        (log map, averaged)
        stop if ‖g‖ < tol
        μ   = cos‖g‖·μ + sin‖g‖·g/‖g‖,   μ = μ/‖μ‖         (exp map, re-normalised)
    out = (Σ_i α_i n_i) · μ          (α = 1/N over ALL inputs, so a zero-norm input shrinks the scale)

One input: out = that input. Every input of norm ≤ tol: out = 0.

Numerics (mergekit 0.1.5): the norms are taken in fp32, everything else (unit vectors, dot products,
angles, the tangent sum, the iterate) in the compute dtype, with a rounding after each operation, and
every iteration is N dot products and N elementwise updates over the whole tensor; ``mergekit_compat``
does the same operations in the same dtypes. Default mode uses that every iterate lies in the span of
the inputs: it runs the very same iteration on the iterate's N coordinates, in fp64, from the inputs'
fp64 Gram matrix, then forms out = Σ c_i x_i in one fp32 pass (``sphere.gram`` / ``sphere.combine``):
two passes over the data instead of ~4·N per iteration, and one rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import MergeMethod, ParamContext, ParamSpec, as_fp32
from .sphere import combine, gram


@dataclasses.dataclass(frozen=True)
class KarcherParams:
    max_iter: int = 10
    tol: float = 1e-5


def karcher_mean(xs: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit 0.1.5's evaluation: the weighted Karcher mean direction of ``xs`` scaled by Σ α_i‖x_i‖, in
    the tensors' dtype, norms in fp32 (fp64 for fp64 tensors)."""
    if len(xs) == 1:
        return xs[0]
    work = torch.float64 if xs[0].dtype == torch.float64 else torch.float32  # mergekit: fp64 stays fp64
    norms = [torch.linalg.vector_norm(x.to(work)) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(xs, norms)]
    keep = [i for i, n in enumerate(norms) if n.item() > tol]
    if not keep:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in keep)
    a = [alphas[i] / total for i in keep]
    u = [units[i] for i in keep]

    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mnorm = torch.linalg.vector_norm(mean.to(work))
    mean = u[0].clone() if mnorm.item() < tol else mean / mnorm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.reshape(-1), ui.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        gnorm = torch.linalg.vector_norm(tangent.to(work))
        if gnorm.item() < tol:
            break
        mean = torch.cos(gnorm) * mean + torch.sin(gnorm) * (tangent / gnorm)
        unorm = torch.linalg.vector_norm(mean.to(work))
        if unorm.item() > tol:
            mean = mean / unorm
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return scale * mean


def karcher_coefficients(g: torch.Tensor, alphas: Sequence[float], max_iter: int, tol: float) -> torch.Tensor:
    """c (float64 [N]) with out = Σ c_i x_i equal to ``karcher_mean`` of the x_i, from their Gram matrix ``g``.

    Every iterate is a combination of the unit vectors u_k = x_k/n_k, so it is kept as its coordinates μ
    on them: ⟨μ, u_k⟩ = (G_u μ)_k and ‖μ‖² = μᵀ G_u μ with G_u = G / (n nᵀ), all in fp64."""
    n = g.diagonal().sqrt()
    out = torch.zeros(len(alphas), dtype=torch.float64)
    keep = [i for i in range(len(alphas)) if n[i] > tol]
    if not keep:
        return out
    nk = n[keep]
    gu = g[keep][:, keep] / (nk[:, None] * nk[None, :])
    total = sum(alphas[i] for i in keep)
    a = torch.tensor([alphas[i] / total for i in keep], dtype=torch.float64)

    # N×N products as elementwise torch ops, not BLAS: MKL's threaded gemv stalls on a busy machine
    def apply(v: torch.Tensor) -> torch.Tensor:  # G_u v
        return (gu * v[None, :]).sum(dim=1)

    def norm(v: torch.Tensor) -> torch.Tensor:
        return (v * apply(v)).sum().clamp(min=0).sqrt()

    mu = a.clone()
    mnorm = norm(mu)
    if mnorm < tol:
        mu = torch.zeros_like(a)
        mu[0] = 1.0  # the first unit vector
    else:
        mu = mu / mnorm
    for _ in range(max_iter):
        dot = apply(mu).clamp(-1.0, 1.0)
        theta = torch.arccos(dot)
        c = torch.where(theta < tol, 0.0, a * theta / torch.sin(theta))  # skipped: θ_k < tol
        tangent = c - (c * dot).sum() * mu  # Σ c_k (u_k − dot_k·μ)
        gnorm = norm(tangent)
        if gnorm < tol:
            break
        mu = torch.cos(gnorm) * mu + torch.sin(gnorm) * (tangent / gnorm)
        unorm = norm(mu)
        if unorm > tol:
            mu = mu / unorm
    scale = sum(al * float(ni) for al, ni in zip(alphas, n))
    out[keep] = scale * mu / nk
    return out


class Karcher(MergeMethod):
    name = "karcher"
    base_as_input = True
    paper_url = "https://arxiv.org/abs/2603.04972"
    base_policy = "ignored"
    tensor_free_params = True
    params = (
        ParamSpec("max_iter", int, 10, per_model=False, doc="maximum number of Riemannian gradient steps"),
        ParamSpec("tol", float, 1e-5, per_model=False, doc="stop when the tangent step norm falls below this"),
    )
    params_type = KarcherParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> KarcherParams:
        return KarcherParams(max_iter=shared["max_iter"], tol=shared["tol"])

    def check(self, params: KarcherParams, where: str) -> None:
        # mergekit accepts both (a negative count runs no iteration, a negative tol keeps zero tensors in the
        # mean as zero "unit" vectors): always a typo, so refused
        if params.max_iter < 0:
            raise ConfigError(f"{where}: max_iter must be >= 0, got {params.max_iter}")
        if params.tol < 0:
            raise ConfigError(f"{where}: tol must be >= 0, got {params.tol}")

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: KarcherParams, compat: bool = False
    ) -> torch.Tensor:
        if not inputs:
            raise ConfigError("karcher: needs at least one model")
        alphas = [1.0 / len(inputs)] * len(inputs)
        if compat:
            return karcher_mean(inputs, alphas, params.max_iter, params.tol)
        if len(inputs) == 1:
            return as_fp32(inputs[0])
        # default: the same iteration on the coordinates of the iterate in the span of the inputs (fp64),
        # from their Gram matrix; then one fp32 pass out = Σ c_i x_i (see sphere.py)
        vs = [x.reshape(1, -1) for x in inputs]
        coef = karcher_coefficients(gram(vs)[0], alphas, params.max_iter, params.tol)
        return combine(vs, coef[None]).reshape(inputs[0].shape)
