"""RAM / RAM+ (tensor-local): sum the changes one model made alone, average the ones several share.

Paper: Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models" (Reinforced Agent
Merging), https://arxiv.org/abs/2601.13572

Per output tensor, with T non-base models and ε = ``epsilon``:

    δ_i = x_i − base;   n_i = [|δ_i| > ε];   c = Σ_i n_i          (per element: how many models changed it)
    ram:         out = base + Σ_i n_i·δ_i · ([c = 1] + [c > 1] / c)
                 an element changed by one model takes that model's change ("unique"), one changed by
                 several takes the mean of their changes ("shared"), one changed by none keeps the base
                 (changes of magnitude ≤ ε are dropped, not averaged in).
    ramplus_tl:  per model i, per tensor, count its shared and unique elements
                     S_i = #{n_i ∧ c > 1},   U_i = #{n_i ∧ c = 1}
                     ρ_i = S_i / max(U_i, ε),   λ_i = 1 + r · clip(ρ_i, 0, α)
                 out = base + Σ_i n_i·δ_i · (λ_i·[c = 1] + [c > 1] / c)
                 so a model whose changes are mostly shared gets its few unique changes boosted by up
                 to (1 + r·α). ε doubles as the floor of U_i, as in mergekit (so U_i = 0 gives ρ_i = S_i/ε,
                 clipped to α; with ε ≥ 1 it also changes ρ_i for U_i ≥ 1).

Each model's shared change is divided by c before the models are summed (not summed, then divided),
as mergekit does: with fp32 compute that is what makes the two bit-exact.
Default mode: fp32 math (δ, the ε test and the counts on fp32 deltas); U_i = 0 sets λ_i = 1 (it scales
nothing), which avoids mergekit's 0/0 = NaN when ε = 0 and a model left a tensor unchanged.
``mergekit_compat``: mergekit 0.1.5's arithmetic in the compute dtype: δ, |δ| > ε (ε rounded to that
dtype: 1e-5 becomes 1.0014e-5 in bf16) and δ/c are in it; λ_i is float32, so ramplus_tl's unique part,
its sum and its result are float32 (mergekit writes float32 tensors for ``dtype: bfloat16``, as
arcee_fusion's issue #604; fastmerge writes the configured dtype, with mergekit's values rounded to it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import MergeMethod, ParamContext, ParamSpec, as_fp32


@dataclasses.dataclass(frozen=True)
class RamParams:
    epsilon: float = 1e-5
    plus: bool = False  # ramplus_tl: scale unique changes by λ_i
    r: float = 0.1
    alpha: float = 0.2


def unique_scales(nonzero: torch.Tensor, unique: torch.Tensor, shared: torch.Tensor, p: RamParams,
                  guard: bool) -> torch.Tensor:
    """λ_i = 1 + r·clip(S_i / max(U_i, ε), 0, α) as a float32 [T] tensor (``guard``: U_i = 0 gives 1)."""
    s = (nonzero & shared).sum(dim=1)
    u = (nonzero & unique).sum(dim=1)
    rho = s / u.clamp(min=p.epsilon)  # int64 / float32 → float32
    lam = 1 + p.r * rho.clamp(min=0, max=p.alpha)
    return torch.where(u == 0, 1.0, lam) if guard else lam


def ram_fp32(inputs: Sequence[torch.Tensor], base: torch.Tensor, p: RamParams) -> torch.Tensor:
    """Default mode. One division per kept change: a unique change is δ·λ/1, a shared one δ·1/c, the
    same fp32 values mergekit gets from its two terms (one of which is always ±0)."""
    b = as_fp32(base)
    deltas = torch.stack([as_fp32(x) - b for x in inputs]).reshape(len(inputs), -1)  # [T, N]
    changed = deltas.abs() > p.epsilon
    count = changed.sum(dim=0)  # [N] int64
    kept = deltas * changed
    if p.plus:
        unique = count == 1
        lam = unique_scales(changed, unique, count > 1, p, guard=True)
        kept = kept * torch.where(unique, lam.unsqueeze(-1), 1.0)  # λ_i on model i's unique changes only
    return b + (kept / count.clamp(min=1)).sum(dim=0).reshape(base.shape)


def ram_mergekit(inputs: Sequence[torch.Tensor], base: torch.Tensor, p: RamParams) -> torch.Tensor:
    """mergekit_compat: its unique and shared terms kept apart, for its dtype promotions (δ/c rounded in
    the compute dtype, λ float32)."""
    deltas = torch.stack([x - base for x in inputs]).reshape(len(inputs), -1)
    changed = deltas.abs() > p.epsilon  # ε converted to the compute dtype by torch's scalar rules
    count = changed.sum(dim=0, keepdim=True)
    unique, shared = count == 1, count > 1
    kept = deltas * changed
    solo = kept * unique
    if p.plus:
        solo = solo * unique_scales(changed, unique, shared, p, guard=False).unsqueeze(-1)
    merged = (solo + kept * shared / count.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


class Ram(MergeMethod):
    name = "ram"
    paper_url = "https://arxiv.org/abs/2601.13572"
    base_policy = "required"
    tensor_free_params = True
    params = (
        ParamSpec("epsilon", float, 1e-5, per_model=False, doc="a model changed an element if |δ| > epsilon"),
    )
    params_type = RamParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> RamParams:
        return RamParams(epsilon=shared["epsilon"])

    def check(self, params: RamParams, where: str) -> None:
        if params.epsilon < 0:
            raise ConfigError(f"{where}: epsilon must be ≥ 0 (a magnitude threshold), got {params.epsilon}")

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: RamParams, compat: bool = False
    ) -> torch.Tensor:
        assert base is not None
        return ram_mergekit(inputs, base, params) if compat else ram_fp32(inputs, base, params)


class RamPlusTL(Ram):
    name = "ramplus_tl"
    params = (
        ParamSpec("r", float, 0.1, per_model=False, doc="boost strength of unique changes"),
        ParamSpec("alpha", float, 0.2, per_model=False, doc="cap of the shared/unique ratio, ≥ 0"),
        ParamSpec("epsilon", float, 1e-5, per_model=False,
                  doc="a model changed an element if |δ| > epsilon; also the floor of the unique count"),
    )

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> RamParams:
        return RamParams(epsilon=shared["epsilon"], plus=True, r=shared["r"], alpha=shared["alpha"])

    def check(self, params: RamParams, where: str) -> None:
        super().check(params, where)
        if params.alpha < 0:
            raise ConfigError(f"{where}: alpha must be ≥ 0 (ρ is clipped to [0, alpha]), got {params.alpha}")
