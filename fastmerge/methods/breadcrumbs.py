"""Model Breadcrumbs: drop the smallest and the largest task-vector entries (breadcrumbs, breadcrumbs_ties).

Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
https://arxiv.org/abs/2312.06795

Per output tensor, for each non-base model i, over the whole flattened tensor (N entries), by |δ_i|:

    n_top  = ⌊gamma_i·N⌋         (outliers dropped from the top)
    target = ⌊density_i·N⌋       (entries kept; no minimum of 1)
    n_bot  = max(0, N − target − n_top)
    keep the entries of ascending |δ_i|-rank in [n_bot, n_bot + target)
    then the generalized-task-arithmetic tail (``gta``), rescale off by default:
        breadcrumbs:      weighted sum (normalize: false)
        breadcrumbs_ties: sum sign consensus, weighted sum of agreeing entries (normalize: false)

This is mergekit 0.1.5's rule. 0.1.4 kept ``[n_bot : −n_top]``, i.e. nothing at all when n_top = 0
(gamma 0, or any tensor with fewer than 1/gamma entries, e.g. a 64-entry norm at gamma 0.01).
density ≥ 1 keeps δ_i whole, outliers included, as in mergekit.

Selection (no sort): ``threshold`` (default) takes the band's two boundary magnitudes with
``kthvalue`` and keeps every |δ| between them, boundary ties included (bf16-derived deltas repeat
values; a kept extra 0 changes nothing); ``topk`` keeps exactly ``target`` entries, breaking the
boundary ties by index order. ``mergekit_compat`` reproduces mergekit's arithmetic in the compute dtype
and its exact-count selection in ``torch.sort`` order (the only place a sort is used).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import MergeMethod, NativeKernel, ParamContext, ParamSpec, TritonKernel, as_fp32
from .gta import check_density, check_divisor, compat_rescaled, gta_params, merge_compat, merge_fp32


@dataclasses.dataclass(frozen=True)
class BreadcrumbsParams:
    weight: tuple[float, ...]
    density: tuple[float, ...]
    gamma: tuple[float, ...]
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = False
    selection: str = "threshold"  # "threshold" | "topk"


def band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, target): the kept ascending ranks are [n_bot, n_bot + target) (mergekit 0.1.5)."""
    target = int(density * numel)
    n_top = int(gamma * numel)
    return max(0, numel - target - n_top), target


def band_mask(delta: torch.Tensor, density: float, gamma: float, selection: str) -> torch.Tensor | None:
    """Boolean keep mask of ``delta`` (any shape), per tensor; None for density ≥ 1 (kept whole)."""
    if density >= 1:
        return None
    mag = as_fp32(delta).abs().reshape(-1)
    n = mag.numel()
    n_bot, target = band(n, density, gamma)
    if target == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    hi = torch.kthvalue(mag, n_bot + target).values  # the largest kept magnitude
    keep = mag <= hi
    if n_bot > 0:  # n_bot = 0: the band starts at the smallest magnitude, no lower bound needed
        lo = torch.kthvalue(mag, n_bot + 1).values
        keep &= mag >= lo
    else:
        lo = mag.min()
    if selection == "topk":
        # exact: position of an entry in the (|δ|, index)-ordered list must fall in [n_bot, n_bot + target)
        keep = (mag > lo) & (mag < hi)
        for v in {float(lo), float(hi)}:
            at = mag == v
            pos = (mag < v).sum() + torch.cumsum(at, 0) - 1
            keep |= at & (pos >= n_bot) & (pos < n_bot + target)
    return keep.reshape(delta.shape)


def band_compat(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """mergekit's ``sparsify.magnitude_outliers``: exact band in ``torch.sort`` order, compute dtype."""
    if density >= 1:
        return delta
    n = delta.numel()
    n_bot, target = band(n, density, gamma)
    order = torch.sort(delta.abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot:n_bot + target]] = 1
    return compat_rescaled(delta, mask.reshape(delta.shape), rescale)



def _native_run(
    method: Any, p: BreadcrumbsParams, out: Any, inputs: Sequence[Any], base: Any, threads: int, shape: Any
) -> None:
    from .. import _native

    _native.breadcrumbs(out, inputs, base, p.weight, p.density, p.gamma, method.consensus, p.normalize, p.lambda_,
                        p.rescale, p.selection == "topk", threads)


def _triton_reasons(p: BreadcrumbsParams) -> list[str]:
    if p.selection != "threshold":
        return ["breadcrumbs selection 'topk' (exact count at both band edges) is in the torch backend only"]
    return []


class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs: keep a band of magnitudes, then a weighted sum of the task vectors."""

    name = "breadcrumbs"
    native = NativeKernel(_native_run)
    triton = TritonKernel("breadcrumbs:BreadcrumbsKernel", reasons=_triton_reasons)
    paper_url = "https://arxiv.org/abs/2312.06795"
    base_policy = "required"
    tensor_free_params = True
    consensus: str | None = None
    params = gta_params(normalize=False, rescale=False) + (
        ParamSpec("gamma", float, 0.01, per_model=True, doc="fraction of largest-magnitude entries dropped, in [0, 1]"),
        ParamSpec(
            "selection", str, "threshold", per_model=False,
            doc="band: threshold (keep boundary ties) or topk (exactly density·N)", choices=("threshold", "topk"),
        ),
    )
    params_type = BreadcrumbsParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> BreadcrumbsParams:
        return BreadcrumbsParams(
            weight=tuple(per_model["weight"]),
            density=tuple(per_model["density"]),
            gamma=tuple(per_model["gamma"]),
            normalize=shared["normalize"],
            lambda_=shared["lambda"],
            rescale=shared["rescale"],
            selection=shared["selection"],
        )

    def check(self, params: BreadcrumbsParams, where: str) -> None:
        check_density(params.density, where)
        for i, g in enumerate(params.gamma):
            if not (0.0 <= g <= 1.0):
                raise ConfigError(f"{where}: gamma of model #{i + 1} must be in [0, 1], got {g}")
        check_divisor(params.weight, params.normalize, self.consensus, where)

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: BreadcrumbsParams, compat: bool = False
    ) -> torch.Tensor:
        assert base is not None
        p = params
        if compat:
            def sparsify(i: int, delta: torch.Tensor) -> torch.Tensor:
                return band_compat(delta, p.density[i], p.gamma[i], p.rescale)

            return merge_compat(inputs, base, p.weight, sparsify, self.consensus, p.normalize, p.lambda_)
        return merge_fp32(
            inputs, base, p.weight, lambda i, delta: band_mask(delta, p.density[i], p.gamma[i], p.selection),
            p.rescale, self.consensus, p.normalize, p.lambda_,
        )


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs + TIES sign consensus."""

    name = "breadcrumbs_ties"
    consensus = "sum"
