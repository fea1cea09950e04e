"""Generalized task arithmetic: the tail shared by ties, dare_*, breadcrumbs* and della*.

Every method of the family sparsifies each task vector on its own, then merges them the same way
(mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``; the consensus is TIES's sign election):

    δ_i   = x_i − base
    k_i   = the method's keep mask of δ_i        (ties: top-k; dare: Bernoulli; della: rank-weighted
                                                  Bernoulli; breadcrumbs: a band of magnitudes)
    δ'_i  = k_i·δ_i · ‖δ_i‖₁/‖k_i·δ_i‖₁          (rescale; skipped when either norm is < 1e-7)
    wδ_i  = w_i·δ'_i
    consensus "sum":   s = sign(Σ_i wδ_i) (0 elects +),  a_i = [sign(wδ_i) == s]
    consensus "count": s = sign(Σ_i sign(wδ_i)),         a_i as above
    no consensus:      a_i = 1
    out   = base + λ · Σ_i a_i·wδ_i [/ Σ_i a_i·w_i  if normalize; a zero divisor (|·| < 1e-8 without
                                      consensus) becomes 1]

A sparsifier that is given density ≥ 1 leaves δ_i untouched (no rescale), as mergekit does: its
keep function returns ``None``. The consensus is fixed by the method name (a class attribute:
dare_ties, breadcrumbs_ties and della "sum"; the others none), ties alone exposes ``election``.

Default mode (``merge_fp32``): fp32 math, the caller rounds once. ``mergekit_compat``
(``merge_compat``): mergekit's arithmetic in the compute dtype, where δ, w·δ, the sums and the
rescale all round to bf16 when the config's dtype is bfloat16.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, ParamSpec, as_fp32
from .linear import weight_divisor
from .task_arithmetic import compat_finish, compat_weights

#: mergekit's rescale guard: no rescale when ‖δ‖₁ or ‖k·δ‖₁ is below this
RESCALE_EPS = 1e-7

#: (model index, fp32 delta) -> bool keep mask of the delta's shape, or None to keep it whole
KeepFn = Callable[[int, "torch.Tensor"], "torch.Tensor | None"]
#: (model index, delta in the compute dtype) -> sparsified (and rescaled) delta in the same dtype
CompatSparsifyFn = Callable[[int, "torch.Tensor"], "torch.Tensor"]


def l1_rescaled(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep·δ`` times ‖δ‖₁/‖keep·δ‖₁ (fp32), unless either norm is < 1e-7 (mergekit's L1 rule: the
    factor preserves the L1 norm; for a random mask it equals 1/density only in expectation)."""
    masked = torch.where(keep, delta, 0.0)
    # Norms summed in fp64 and rounded once: torch's fp32 sum changes with its thread count (10 of 20
    # sums differed between 1 and 2 threads), fp64 makes the reference deterministic and the C++ kernels
    # (which do the same) bit-exact with it.
    before = delta.abs().sum(dtype=torch.float64).to(torch.float32)
    after = masked.abs().sum(dtype=torch.float64).to(torch.float32)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def weighted_kept(delta: torch.Tensor, keep: torch.Tensor | None, weight: float, rescale: bool) -> torch.Tensor:
    """w·δ' (fp32): the kept, optionally L1-rescaled entries, 0 elsewhere; ``keep=None`` keeps all."""
    w = torch.tensor(weight, dtype=torch.float32)
    if keep is None:
        return w * delta
    if rescale:
        delta = l1_rescaled(delta, keep)
    return torch.where(keep, w * delta, 0.0)


def combine(
    b: torch.Tensor, wds: Sequence[torch.Tensor], weight: Sequence[float], consensus: str | None,
    normalize: bool, lambda_: float,
) -> torch.Tensor:
    """The fp32 tail: consensus, disjoint mean / weighted sum, λ, + base. ``wds`` = weighted kept deltas."""
    num = torch.zeros_like(b)
    if consensus is None:
        for wd in wds:
            num = num + wd
        if normalize:
            div = weight_divisor(weight, True)
            num = num / torch.tensor(1.0 if abs(div) < 1e-8 else div, dtype=torch.float32)
    else:
        total = torch.zeros_like(b)
        for wd in wds:
            total = total + (wd if consensus == "sum" else torch.sign(wd))
        majority = torch.where(total >= 0, 1.0, -1.0)
        div = torch.zeros_like(b)
        for wd, w in zip(wds, weight):
            agree = torch.sign(wd) == majority  # pruned entries (0) never agree
            num = num + torch.where(agree, wd, 0.0)
            div = div + torch.where(agree, torch.tensor(w, dtype=torch.float32), 0.0)
        if normalize:
            num = num / torch.where(div == 0, 1.0, div)
    if lambda_ != 1:
        num = num * torch.tensor(lambda_, dtype=torch.float32)
    return b + num


def merge_fp32(
    inputs: Sequence[torch.Tensor], base: torch.Tensor, weight: Sequence[float], keep_fn: KeepFn,
    rescale: bool, consensus: str | None, normalize: bool, lambda_: float,
) -> torch.Tensor:
    """Default mode: fp32 deltas, ``keep_fn(i, δ_i)`` masks, the shared tail; fp32 result."""
    b = as_fp32(base)
    wds = []
    for i, (x, w) in enumerate(zip(inputs, weight)):
        delta = as_fp32(x) - b
        wds.append(weighted_kept(delta, keep_fn(i, delta), w, rescale))
    return combine(b, wds, weight, consensus, normalize, lambda_)


def compat_rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """mergekit's masked, optionally L1-rescaled delta in ``delta``'s dtype (``mask``: 0/1, same dtype):
    the norms, their ratio and the product each round to that dtype."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def compat_combine(
    base: torch.Tensor, deltas: torch.Tensor, weight: Sequence[float], consensus: str | None,
    normalize: bool, lambda_: float,
) -> torch.Tensor:
    """mergekit 0.1.5's tail on the stacked sparsified deltas [T, ...] (compute dtype)."""
    w = compat_weights(weight, deltas)
    deltas = deltas * w
    mask = None
    if consensus is not None:
        sign = deltas.sign()
        total = deltas.sum(dim=0) if consensus == "sum" else sign.sum(dim=0)
        majority = (total >= 0).to(base.dtype) * 2 - 1
        mask = (sign == majority).to(base.dtype)
    return compat_finish(base, deltas, w, mask, normalize, lambda_)


def merge_compat(
    inputs: Sequence[torch.Tensor], base: torch.Tensor, weight: Sequence[float], sparsify_fn: CompatSparsifyFn,
    consensus: str | None, normalize: bool, lambda_: float,
) -> torch.Tensor:
    """mergekit_compat: δ_i = x_i − base and ``sparsify_fn(i, δ_i)`` in the compute dtype, then the tail."""
    deltas = torch.empty((len(inputs),) + tuple(base.shape), dtype=base.dtype, device=base.device)
    for i, x in enumerate(inputs):
        deltas[i] = sparsify_fn(i, x - base)
    return compat_combine(base, deltas, weight, consensus, normalize, lambda_)


def check_density(density: Sequence[float], where: str) -> None:
    for i, d in enumerate(density):
        if not (0.0 < d <= 1.0):
            raise ConfigError(f"{where}: density of model #{i + 1} must be in (0, 1], got {d}")


def check_divisor(weight: Sequence[float], normalize: bool, consensus: str | None, where: str) -> None:
    # as task_arithmetic: without consensus, normalize divides every entry by Σw (mergekit silently uses 1)
    if normalize and consensus is None and weight_divisor(weight, True) == 0.0:
        raise ConfigError(f"{where}: weights sum to 0 with normalize: true (division by zero)")


def gta_params(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    """mergekit's parameters of every generalized-task-arithmetic method, with this method's defaults."""
    return (
        ParamSpec("weight", float, REQUIRED, per_model=True, doc="weight of the model's task vector"),
        ParamSpec("density", float, 1.0, per_model=True, doc="fraction of each task vector kept, in (0, 1]"),
        ParamSpec("normalize", bool, normalize, per_model=False, doc="divide by the (agreeing) weights' sum"),
        ParamSpec("lambda", float, 1.0, per_model=False, doc="scale of the merged task vector"),
        ParamSpec("rescale", bool, rescale, per_model=False, doc="L1-rescale each sparsified task vector"),
        ParamSpec("int8_mask", bool, False, per_model=False, doc="accepted for mergekit configs; memory only"),
    )
