"""CART's Python API: the paper's analyses (reverse order, routing), CART++ and the rank sweep.

Paper: Choi et al., "Revisiting Weight Averaging for Model Merging", https://arxiv.org/abs/2412.12153
(``merge_method: cart`` itself is ``fastmerge.methods.cart``; this module reuses its parts.)

    merge(tensors, rank_ratio=0.08, lam=1.0)            θ_avg + λ·Σ_t SVD_k(θ_t − θ_avg)          (Eq. 4)
    merge(tensors, ..., order="reverse")                the same with the LOWEST k singular triplets (Fig. 2)
    route(tensors, ..., base=None)                      per task: θ + SVD_k(θ_t − θ), θ = θ_avg or θ_0 (Eq. 5, Fig. 3)
    merge_state_dicts / route_state_dicts               the same over state dicts (``targets`` selects the matrices)
    factorize(state_dicts) → CartFactors                θ_avg + per-task rank-k factors, kept for CART++
    adapt(module, factors, unlabeled_batches)           CART++: task- and layer-wise λ by entropy minimisation
                                                        (Eq. 6, Algorithm 2), via torch.func.functional_call
    rank_sweep(config, out_dir, [0.02, 0.04, 0.08])     one SVD pass at the largest rank, one model per value
                                                        in out_dir/rank-<value>/ (``fastmerge.engine.sweep``)

Reverse order needs every singular triplet, so it always uses the exact SVD. ``svd`` defaults to
"randomized" for top-order merges (as ``merge_method: cart``) and must be "exact" for reverse order.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..methods.cart import DEFAULT_TARGETS, matches_targets, rank_for
from ..ops.randomized_svd import (
    DEFAULT_POWER_ITERS, CenteredFactors, centered_factors, target_rank, weight_average,
)

ORDERS = ("top", "reverse")


# --------------------------------------------------------------------------------------------
# tensors


def _rank(shape: Sequence[int], rank_ratio: float, rank: int) -> int:
    if not 0.0 <= rank_ratio <= 1.0:
        raise ConfigError(f"rank_ratio must be in [0, 1], got {rank_ratio}")
    return target_rank(shape, rank_ratio, rank)


def _svd_kind(order: str, svd: str | None) -> str:
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "reverse":
        if svd not in (None, "exact"):
            raise ConfigError("order='reverse' keeps the smallest singular triplets: it needs svd='exact'")
        return "exact"
    if svd not in (None, "randomized", "exact"):
        raise ConfigError(f"svd must be 'randomized' or 'exact', got {svd!r}")
    return svd or "randomized"


def lowrank_terms(
    tensors: Sequence[torch.Tensor],
    *,
    origin: torch.Tensor | None = None,
    rank_ratio: float = 0.08,
    rank: int = 0,
    energy: float = 0.0,
    order: str = "top",
    svd: str | None = None,
    oversample: int | None = None,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(θ, [SVD_k(θ_t − θ) for each t]) in fp32, θ = ``origin`` (default: the weight average).

    ``order="top"``: the k largest singular triplets; ``"reverse"``: the k smallest of all min(m, n)."""
    kind = _svd_kind(order, svd)
    x0 = tensors[0]
    if x0.dim() != 2:
        raise ConfigError(f"lowrank_terms: needs 2-D matrices, got shape {list(x0.shape)}")
    theta = weight_average(tensors) if origin is None else origin.float()
    k = _rank(x0.shape, rank_ratio, rank)
    if order == "reverse":
        if energy > 0:
            raise ConfigError("order='reverse' takes rank_ratio or rank, not energy")
        terms = []
        for x in tensors:
            u, s, vh = torch.linalg.svd(x.float() - theta, full_matrices=False)
            r = s.numel()
            terms.append((u[:, r - k:] * s[r - k:]) @ vh[r - k:] if k else torch.zeros_like(theta))
        return theta, terms
    f = centered_factors(tensors, k, svd=kind, energy=energy, oversample=oversample, power_iters=power_iters,
                         seed=seed, backend=backend, avg=theta)
    return theta, [f.lowrank(t) for t in range(len(tensors))]


def merge(tensors: Sequence[torch.Tensor], *, lam: float = 1.0, order: str = "top", **kwargs: Any) -> torch.Tensor:
    """CART of same-shape 2-D tensors: θ_avg + λ·Σ_t SVD_k(θ_t − θ_avg), fp32 (paper Eq. 4).

    Keyword arguments: rank_ratio (0.08), rank, energy, svd, oversample, power_iters, seed, backend
    (see ``lowrank_terms``). ``order="reverse"`` keeps the k smallest singular triplets (Figure 2)."""
    kind = _svd_kind(order, kwargs.get("svd"))
    if order == "top":  # the fused path: one GEMM of inner dimension T·k added to θ_avg
        k = _rank(tensors[0].shape, kwargs.pop("rank_ratio", 0.08), kwargs.pop("rank", 0))
        kwargs["svd"] = kind
        f = centered_factors(tensors, k, **kwargs)
        return f.reconstruct(lam, backend=kwargs.get("backend", "auto"))
    theta, terms = lowrank_terms(tensors, order=order, **kwargs)
    for t in terms:
        theta = theta + lam * t
    return theta


def route(
    tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None, **kwargs: Any
) -> list[torch.Tensor]:
    """Per-task routed weights R_k(t; θ) = θ + SVD_k(θ_t − θ), θ = θ_avg (default) or ``base`` = θ_0
    (paper Eq. 5, Figure 3). Keyword arguments as ``lowrank_terms`` (order="reverse" for Fig. 3b)."""
    theta, terms = lowrank_terms(tensors, origin=base, **kwargs)
    return [theta + t for t in terms]


def _check_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if not state_dicts:
        raise ConfigError("no state dicts given")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ConfigError(f"state_dicts[{i}] lacks '{missing[0]}'")
        for k in keys:
            if sd[k].shape != state_dicts[0][k].shape:
                raise ConfigError(f"state_dicts[{i}]['{k}'] has shape {list(sd[k].shape)}, "
                                  f"state_dicts[0] {list(state_dicts[0][k].shape)}")
    return keys


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], *, targets: str = DEFAULT_TARGETS, lam: float = 1.0,
    order: str = "top", out_dtype: torch.dtype | None = None, **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """CART over state dicts: selected 2-D tensors (``targets``, as ``merge_method: cart``) get
    ``merge``; every other tensor the plain average. Output in each tensor's dtype (or ``out_dtype``)."""
    out = {}
    for key in _check_state_dicts(state_dicts):
        xs = [sd[key] for sd in state_dicts]
        if xs[0].dim() == 2 and matches_targets(key, targets):
            v = merge(xs, lam=lam, order=order, **kwargs)
        else:
            v = weight_average(xs)
        out[key] = v.to(out_dtype or xs[0].dtype)
    return out


def route_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], *, base: Mapping[str, torch.Tensor] | None = None,
    targets: str = DEFAULT_TARGETS, out_dtype: torch.dtype | None = None, **kwargs: Any,
) -> list[dict[str, torch.Tensor]]:
    """One routed model per task: selected tensors θ + SVD_k(θ_t − θ); every other tensor keeps the task's
    own dense weights θ_t (θ + (θ_t − θ), the official code's task-indexed mode)."""
    outs: list[dict[str, torch.Tensor]] = [{} for _ in state_dicts]
    for key in _check_state_dicts(state_dicts):
        xs = [sd[key] for sd in state_dicts]
        if xs[0].dim() == 2 and matches_targets(key, targets):
            vals = route(xs, base=None if base is None else base[key], **kwargs)
        else:
            vals = list(xs)
        for o, v, x in zip(outs, vals, xs):
            o[key] = v.to(out_dtype or x.dtype)
    return outs


# --------------------------------------------------------------------------------------------
# CART++


@dataclasses.dataclass
class CartFactors:
    """θ_avg of every tensor plus, for the low-rank tensors, each task's rank-k factors:
    SVD_k(θ_t − θ_avg) = left[t] @ right[t]ᵀ, left (T, m, k) = U_k·diag(S_k), right (T, n, k) = V_k
    (zero-padded to the largest k_t when ``energy`` picks ranks per task)."""

    avg: dict[str, torch.Tensor]
    left: dict[str, torch.Tensor]
    right: dict[str, torch.Tensor]
    n_tasks: int

    def to(self, device: torch.device | str) -> "CartFactors":
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return CartFactors(mv(self.avg), mv(self.left), mv(self.right), self.n_tasks)

    def update(self, name: str, lam: torch.Tensor | float) -> torch.Tensor:
        """Σ_t λ_t·SVD_k(θ_t − θ_avg) of tensor ``name`` (λ: scalar or (T,)), one GEMM of inner dim T·k."""
        left, right = self.left[name], self.right[name]
        T, m, k = left.shape
        lam_t = torch.as_tensor(lam, dtype=left.dtype, device=left.device).reshape(-1, 1, 1)
        scaled = (left * lam_t).permute(1, 0, 2).reshape(m, T * k)
        return scaled @ right.permute(1, 0, 2).reshape(right.shape[1], T * k).T

    def merged(self, lam: float | Mapping[str, torch.Tensor] = 1.0) -> dict[str, torch.Tensor]:
        """θ_avg + Σ_t λ_t·SVD_k(θ_t − θ_avg) for the low-rank tensors, θ_avg elsewhere (fp32)."""
        out = {}
        for name, a in self.avg.items():
            if name in self.left:
                out[name] = a + self.update(name, lam[name] if isinstance(lam, Mapping) else lam)
            else:
                out[name] = a
        return out


def factorize(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], *, targets: str = DEFAULT_TARGETS,
    rank_ratio: float = 0.08, rank: int = 0, energy: float = 0.0, svd: str = "randomized",
    oversample: int | None = None, power_iters: int = DEFAULT_POWER_ITERS, seed: int = 0, backend: str = "auto",
) -> CartFactors:
    """θ_avg and the fixed rank-k factors of every selected 2-D tensor (input of ``adapt``)."""
    avg, left, right = {}, {}, {}
    for key in _check_state_dicts(state_dicts):
        xs = [sd[key] for sd in state_dicts]
        if xs[0].dim() == 2 and matches_targets(key, targets):
            k = _rank(xs[0].shape, rank_ratio, rank)
            f: CenteredFactors = centered_factors(xs, k, svd=svd, energy=energy, oversample=oversample,
                                                  power_iters=power_iters, seed=seed, backend=backend)
            kmax = max(f.ranks) if f.ranks else 0
            pad = lambda ts, d: torch.stack([torch.nn.functional.pad(t, (0, kmax - t.shape[-1])) for t in ts])  # noqa: E731
            left[key], right[key] = pad(f.us, 0), pad(f.v, 0)
            avg[key] = f.avg
        else:
            avg[key] = weight_average(xs)
    return CartFactors(avg, left, right, len(state_dicts))


@dataclasses.dataclass
class AdaptResult:
    """CART++ result: λ per (group, task), the group of each low-rank tensor, the loss per step."""

    lambdas: torch.Tensor  # (G, T)
    groups: dict[str, int]  # low-rank tensor name -> row of ``lambdas``
    group_names: list[str]
    losses: list[float]
    factors: CartFactors

    def lambda_of(self, name: str) -> torch.Tensor:
        return self.lambdas[self.groups[name]]

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged weights θ_avg + Σ_t λ_t^l·SVD_k(θ_t − θ_avg) at the learned λ (detached)."""
        with torch.no_grad():
            sd = self.factors.merged({n: self.lambda_of(n) for n in self.groups})
        return {k: (v if dtype is None else v.to(dtype)) for k, v in sd.items()}


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the last dimension (Algorithm 2, line 6)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _group_of(name: str, granularity: str) -> str:
    if granularity == "tensor":
        return name
    if granularity == "task":
        return "*"
    from ..plan import layer_index

    li = layer_index(name)
    return f"layer {li}" if li is not None else name


def adapt(
    module: torch.nn.Module,
    factors: CartFactors,
    unlabeled_batches: Iterable[Any],
    *,
    steps: int | None = None,
    lr: float = 1e-3,
    init: float = 1.0,
    granularity: str = "tensor",
    optimizer: str = "adam",
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] = entropy_loss,
) -> AdaptResult:
    """CART++ (paper Eq. 6, Algorithm 2): learn λ_t^l on unlabeled data, the low-rank factors fixed.

    θ^l(λ) = θ_avg^l + Σ_t λ_t^l·SVD_k(θ_t^l − θ_avg^l) is evaluated through
    ``torch.func.functional_call(module, θ(λ), batch)``; the loss (default: mean prediction entropy of
    the module's output, or of ``output_fn(output)``) is minimised over λ only (``module``'s own
    parameters are neither used for the factored names nor changed). ``granularity``: "tensor" (one λ per
    task and low-rank tensor: AdaMerging's layer-wise), "layer" (per task and transformer layer index)
    or "task" (one λ per task). ``steps`` batches are drawn, cycling ``unlabeled_batches`` (default:
    one pass). A batch is a tensor or a tuple of positional arguments. ``init``: the starting λ (CART's)."""
    if granularity not in ("tensor", "layer", "task"):
        raise ConfigError(f"granularity must be 'tensor', 'layer' or 'task', got {granularity!r}")
    if optimizer not in ("adam", "sgd"):
        raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    from torch.func import functional_call

    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    factors = factors.to(device)
    names = list(factors.left)
    group_names: list[str] = []
    groups: dict[str, int] = {}
    for n in names:
        g = _group_of(n, granularity)
        if g not in group_names:
            group_names.append(g)
        groups[n] = group_names.index(g)
    lam = torch.nn.Parameter(torch.full((len(group_names), factors.n_tasks), float(init), device=device))
    opt = torch.optim.Adam([lam], lr=lr) if optimizer == "adam" else torch.optim.SGD([lam], lr=lr)
    batches = list(unlabeled_batches) if steps is not None else unlabeled_batches
    it: Iterable[Any] = itertools.islice(itertools.cycle(batches), steps) if steps is not None else batches
    fixed = {k: v for k, v in factors.avg.items() if k not in factors.left}
    losses: list[float] = []
    for batch in it:
        weights = dict(fixed)
        for n in names:
            weights[n] = factors.avg[n] + factors.update(n, lam[groups[n]])
        args = batch if isinstance(batch, tuple) else (batch,)
        out = functional_call(module, weights, args)
        loss = loss_fn(output_fn(out) if output_fn is not None else out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return AdaptResult(lam.detach().clone(), groups, group_names, losses, factors)


from ..engine.sweep import SweepReport, rank_sweep, sweep_dir_name  # noqa: E402  (the engine's; re-exported)


__all__ = [
    "merge", "route", "lowrank_terms", "merge_state_dicts", "route_state_dicts", "factorize", "CartFactors",
    "adapt", "AdaptResult", "entropy_loss", "rank_sweep", "SweepReport", "sweep_dir_name",
    "rank_for",
]
