"""DARE: drop task-vector entries at random and rescale (dare_linear, dare_ties).

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", https://arxiv.org/abs/2311.03099

Per output tensor, for each non-base model i (its index among the non-base inputs):

    δ_i   = x_i − base
    m_i   = [u_i < density_i]  element by element, u_i = rng.uniform(seed, hash(tensor name), i, ·)
    δ'_i  = m_i·δ_i · ‖δ_i‖₁/‖m_i·δ_i‖₁       (rescale: true, the default; skipped when a norm < 1e-7)
    then the generalized-task-arithmetic tail (``gta``):
        dare_ties:   sum sign consensus, weighted sum of agreeing entries (normalize: false)
        dare_linear: weighted sum (normalize: false)

The rescale is mergekit 0.1.5's L1 rule (the L1 norm of δ_i is preserved exactly), not the paper's
1/density, which it equals only in expectation. density ≥ 1 keeps δ_i whole (no rescale).

The mask comes from fastmerge's counter-based generator (``fastmerge.methods.rng``), a pure function of
(seed, tensor name, model index, element index), so every backend gives the same bits for one seed.
mergekit draws from torch's global RNG instead: its masks cannot be reproduced bit for bit, only in
distribution. ``mergekit_compat`` reproduces its arithmetic: the keep probability is ``density``
rounded to mergekit's work dtype (bf16 for bf16 compute: 0.33 becomes 0.330078125; fp32 otherwise,
since torch.bernoulli has no fp16 CPU kernel) and the rescale runs in that work dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from . import rng
from .base import MergeMethod, NativeKernel, ParamContext, TritonKernel
from .gta import check_density, check_divisor, compat_rescaled, gta_params, merge_compat, merge_fp32


@dataclasses.dataclass(frozen=True)
class DareParams:
    weight: tuple[float, ...]
    density: tuple[float, ...]
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = True
    seed: int = 0
    key: int = 0  # stable hash of the tensor name (ParamContext.key)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """mergekit's dtype for random masks on CPU: bf16 stays bf16, anything else runs in fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def dare_keep(
    shape: Sequence[int], density: float, seed: int, key: int, model: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """The keep mask of model ``model``'s delta (bool, ``shape``); None for density ≥ 1 (kept whole)."""
    if density >= 1:
        return None
    return rng.keep_mask(seed, key, model, density, shape, device=device)


def dare_compat(delta: torch.Tensor, density: float, rescale: bool, seed: int, key: int, model: int) -> torch.Tensor:
    """mergekit's ``sparsify.bernoulli`` arithmetic with fastmerge's generator: mask and rescale in the
    work dtype, with the keep probability rounded to it; the result in ``delta``'s dtype."""
    if density >= 1:
        return delta
    work = work_dtype(delta.dtype)
    p = float(torch.tensor(density, dtype=work))
    mask = rng.keep_mask(seed, key, model, p, delta.shape, device=delta.device).to(work)
    return compat_rescaled(delta.to(work), mask, rescale).to(delta.dtype)



def _native_run(method: Any, p: DareParams, out: Any, inputs: Sequence[Any], base: Any, threads: int, shape: Any) -> None:
    from .. import _native

    _native.dare(out, inputs, base, p.weight, p.density, method.consensus, p.normalize, p.lambda_, p.rescale, p.seed,
                 p.key, threads)


class DareLinear(MergeMethod):
    """DARE: random drop with L1 rescale, then a weighted sum of the task vectors."""

    name = "dare_linear"
    native = NativeKernel(_native_run)
    triton = TritonKernel("dare:DareKernel")
    paper_url = "https://arxiv.org/abs/2311.03099"
    base_policy = "required"
    consensus: str | None = None
    params = gta_params(normalize=False, rescale=True)
    params_type = DareParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> DareParams:
        return DareParams(
            weight=tuple(per_model["weight"]),
            density=tuple(per_model["density"]),
            normalize=shared["normalize"],
            lambda_=shared["lambda"],
            rescale=shared["rescale"],
            seed=ctx.seed,
            key=ctx.key,
        )

    def check(self, params: DareParams, where: str) -> None:
        check_density(params.density, where)
        check_divisor(params.weight, params.normalize, self.consensus, where)

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: DareParams, compat: bool = False
    ) -> torch.Tensor:
        assert base is not None
        p = params
        if compat:
            def sparsify(i: int, delta: torch.Tensor) -> torch.Tensor:
                return dare_compat(delta, p.density[i], p.rescale, p.seed, p.key, i)

            return merge_compat(inputs, base, p.weight, sparsify, self.consensus, p.normalize, p.lambda_)
        return merge_fp32(
            inputs, base, p.weight, lambda i, delta: dare_keep(delta.shape, p.density[i], p.seed, p.key, i, delta.device),
            p.rescale, self.consensus, p.normalize, p.lambda_,
        )


class DareTies(DareLinear):
    """DARE + TIES sign consensus: random drop with L1 rescale, then the sum of the agreeing entries."""

    name = "dare_ties"
    consensus = "sum"
