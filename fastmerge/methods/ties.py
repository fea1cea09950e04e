"""TIES-merging: trim, elect sign, disjoint merge.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
https://arxiv.org/abs/2306.01708

Per output tensor (nothing is global across tensors, as in mergekit):

    δ_i   = x_i − base
    m_i   = |δ_i| among the top k_i = max(1, ⌊density_i·numel⌋) magnitudes of δ_i     (trim)
    wδ_i  = m_i · w_i · δ_i
    s     = sign(Σ_i wδ_i)  ("sum", mass-weighted, the paper's)  or  sign(Σ_i sign(wδ_i))  ("count")
            (a zero total elects +1)
    a_i   = [sign(wδ_i) == s]                                                          (trimmed entries never agree)
    out   = base + λ · Σ_i a_i·wδ_i / Σ_i a_i·w_i      (normalize; a zero divisor becomes 1)
    out   = base + λ · Σ_i a_i·wδ_i                    (normalize: false)

Trim selection: ``threshold`` (default) keeps every |δ| ≥ the k-th largest value, so equal magnitudes
at the boundary are all kept (bf16 deltas have many equal values). ``topk`` keeps exactly k, breaking
boundary ties by index order. ``mergekit_compat`` reproduces mergekit 0.1.5 (bf16-native arithmetic,
exactly k kept by a full ``argsort``, its tie order). ``rescale`` multiplies each trimmed δ_i by
‖δ_i‖₁/‖m_i·δ_i‖₁ (skipped when the latter is < 1e-7), as mergekit's ``rescale: true``.

Everything after the trim (weights, election, disjoint mean, λ) is the tail that ties shares with
dare_*, breadcrumbs* and della*: ``fastmerge.methods.gta``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, NativeKernel, ParamContext, ParamSpec, TritonKernel, as_fp32
from .gta import compat_rescaled, merge_compat, merge_fp32


@dataclasses.dataclass(frozen=True)
class TiesParams:
    weight: tuple[float, ...]
    density: tuple[float, ...]
    normalize: bool = True
    lambda_: float = 1.0
    election: str = "sum"  # "sum" | "count"
    selection: str = "threshold"  # "threshold" | "topk"
    rescale: bool = False


def keep_count(density: float, numel: int) -> int:
    """mergekit's k: at least one element of a non-empty tensor."""
    return max(1, int(density * numel))


def trim_mask(delta: torch.Tensor, density: float, selection: str) -> torch.Tensor:
    """Boolean mask of the kept entries of ``delta`` (any shape), by magnitude, per tensor."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    mag = as_fp32(delta).abs().reshape(-1)
    n = mag.numel()
    k = keep_count(density, n)
    threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag >= threshold
    if selection == "topk":
        above = mag > threshold
        room = k - int(above.sum())
        at = mag == threshold
        keep = above | (at & (torch.cumsum(at, 0) <= room))
    return keep.reshape(delta.shape)



def _native_run(method: Any, p: TiesParams, out: Any, inputs: Sequence[Any], base: Any, threads: int, shape: Any) -> None:
    from .. import _native

    _native.ties(out, inputs, base, p.weight, p.density, p.normalize, p.lambda_, p.election, p.selection == "topk",
                 threads, p.rescale)


def _native_segments(method: Any, p: TiesParams, out: Any, inputs: Sequence[Any], base: Any, threads: int,
                     offsets: Sequence[int]) -> None:
    from .. import _native

    _native.ties_segments(out, inputs, base, offsets, p.weight, p.density, p.normalize, p.lambda_, p.election,
                          p.selection == "topk", threads, p.rescale)


class Ties(MergeMethod):
    name = "ties"
    #: the C++ kernel on the CPU, and on CUDA tensors the CUDA C++ kernel (``csrc/cuda/ties.cu``)
    native = NativeKernel(_native_run, cuda=True, segments=_native_segments)
    triton = TritonKernel("ties:TiesKernel")
    paper_url = "https://arxiv.org/abs/2306.01708"
    base_policy = "required"
    tensor_free_params = True
    params = (
        ParamSpec("weight", float, REQUIRED, per_model=True, doc="weight of the model's task vector"),
        ParamSpec("density", float, 1.0, per_model=True, doc="fraction of each task vector kept, in (0, 1]"),
        ParamSpec("normalize", bool, True, per_model=False, doc="disjoint mean (divide by agreeing weights)"),
        ParamSpec("lambda", float, 1.0, per_model=False, doc="scale of the merged task vector"),
        ParamSpec("rescale", bool, False, per_model=False, doc="L1-rescale each trimmed task vector"),
        ParamSpec("int8_mask", bool, False, per_model=False, doc="accepted for mergekit configs; memory only"),
        ParamSpec("election", str, "sum", per_model=False, doc="sign election: sum (paper) or count", choices=("sum", "count")),
        ParamSpec(
            "selection", str, "threshold", per_model=False,
            doc="trim: threshold (keep boundary ties) or topk (exactly k)", choices=("threshold", "topk"),
        ),
    )
    params_type = TiesParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> TiesParams:
        return TiesParams(
            weight=tuple(per_model["weight"]),
            density=tuple(per_model["density"]),
            normalize=shared["normalize"],
            lambda_=shared["lambda"],
            election=shared["election"],
            selection=shared["selection"],
            rescale=shared["rescale"],
        )

    def check(self, params: TiesParams, where: str) -> None:
        for i, d in enumerate(params.density):
            if not (0.0 < d <= 1.0):
                raise ConfigError(f"{where}: density of model #{i + 1} must be in (0, 1], got {d}")

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: TiesParams, compat: bool = False
    ) -> torch.Tensor:
        assert base is not None
        p = params
        if compat:  # mergekit 0.1.5: compute-dtype arithmetic, exactly k kept in ``argsort`` order
            def sparsify(i: int, delta: torch.Tensor) -> torch.Tensor:
                mask = torch.ones_like(delta) if p.density[i] >= 1 else _argsort_mask(delta, p.density[i])
                return compat_rescaled(delta, mask, p.rescale)

            return merge_compat(inputs, base, p.weight, sparsify, p.election, p.normalize, p.lambda_)
        return merge_fp32(
            inputs, base, p.weight, lambda i, delta: trim_mask(delta, p.density[i], p.selection),
            p.rescale, p.election, p.normalize, p.lambda_,
        )


def _argsort_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    mag = delta.abs().reshape(-1).float()
    k = keep_count(density, mag.numel())
    mask = torch.zeros(mag.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(mag, descending=True)[:k]] = 1
    return mask.reshape(delta.shape)
