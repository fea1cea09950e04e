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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, ParamContext, ParamSpec, as_fp32
from .task_arithmetic import compat_finish, compat_weights


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


class Ties(MergeMethod):
    name = "ties"
    paper_url = "https://arxiv.org/abs/2306.01708"
    base_policy = "required"
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
        if compat:
            return self._reference_mergekit(inputs, base, params)
        b = as_fp32(base)
        wds = []
        for x, w, d in zip(inputs, params.weight, params.density):
            delta = as_fp32(x) - b
            keep = trim_mask(delta, d, params.selection)
            if params.rescale:
                delta = _l1_rescaled(delta, keep)
            wds.append(torch.where(keep, torch.tensor(w, dtype=torch.float32) * delta, 0.0))
        if params.election == "sum":
            total = torch.zeros_like(b)
            for wd in wds:
                total = total + wd
        else:
            total = torch.zeros_like(b)
            for wd in wds:
                total = total + torch.sign(wd)
        majority = torch.where(total >= 0, 1.0, -1.0)
        num = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for wd, w in zip(wds, params.weight):
            agree = torch.sign(wd) == majority
            num = num + torch.where(agree, wd, 0.0)
            div = div + torch.where(agree, torch.tensor(w, dtype=torch.float32), 0.0)
        if params.normalize:
            num = num / torch.where(div == 0, 1.0, div)
        if params.lambda_ != 1:
            num = num * torch.tensor(params.lambda_, dtype=torch.float32)
        return b + num

    def _reference_mergekit(self, inputs: Sequence[torch.Tensor], base: torch.Tensor, p: TiesParams) -> torch.Tensor:
        """mergekit 0.1.5: compute-dtype arithmetic, exactly k kept in ``argsort`` order."""
        deltas = torch.empty((len(inputs),) + tuple(base.shape), dtype=base.dtype)
        for i, (x, d) in enumerate(zip(inputs, p.density)):
            delta = x - base
            mask = torch.ones_like(delta) if d >= 1 else _argsort_mask(delta, d)
            masked = delta * mask
            if p.rescale:
                before, after = delta.abs().sum(), masked.abs().sum()
                if after >= 1e-7:
                    masked = masked * (before / after)
            deltas[i] = masked
        w = compat_weights(p.weight, deltas)
        deltas = deltas * w
        sign = deltas.sign()
        if p.election == "sum":
            majority = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        else:
            majority = (sign.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        mask = (sign == majority).to(base.dtype)
        return compat_finish(base, deltas, w, mask, p.normalize, p.lambda_)


def _argsort_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    mag = delta.abs().reshape(-1).float()
    k = keep_count(density, mag.numel())
    mask = torch.zeros(mag.numel(), dtype=delta.dtype)
    mask[torch.argsort(mag, descending=True)[:k]] = 1
    return mask.reshape(delta.shape)


def _l1_rescaled(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    masked = torch.where(keep, delta, 0.0)
    before, after = delta.abs().sum(), masked.abs().sum()
    return masked * (before / after) if after >= 1e-7 else masked
