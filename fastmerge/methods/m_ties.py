"""M-TIES: TIES whose trim keeps more of the rows with low merging-ensembling loss (M-Loss).

Paper: Wang et al., "M-Loss: Quantifying Model Merging Compatibility with Limited Unlabeled Data",
https://arxiv.org/abs/2602.08564 (Section 5, Algorithm 1).

For the matrices that feed an activation (LLaMA: ``mlp.gate_proj`` and ``mlp.up_proj``; node j = row j),
with node M-Loss L_j measured on unlabeled calibration tokens (``fastmerge.mloss``):

    keep_j = k − e · rank(L_j)/(d − 1)      ∈ [k − e, k]   (k = density, e = epsilon; lowest loss keeps k)
    δ_i    = x_i − base;  row j of δ_i keeps its max(1, ⌊keep_j·n_cols⌋) largest |δ| (ties at the boundary kept)
    then TIES: s = sign(Σ_i w_i δ_i'), out = base + λ · Σ_i [sign(w_i δ_i') = s]·w_i δ_i' / Σ_i [...]·w_i

Every other tensor: ordinary TIES with density k (per tensor). The official code's defaults: k = 0.8,
e = 0.1, uniform weights (1 each), λ = 1, the squared node M-Loss ("statistic: sq").

In YAML (``merge_method: m_ties``) the M-Loss needs forward passes, so ``fastmerge.merge`` hands the
config to ``fastmerge.mloss.engine`` (LLaMA-family checkpoints, a ``calibration`` file of token ids;
``layers`` restricts the M-Loss ratios to a few layers, the paper's few-layer variant; ``mode``:
"progressive" feeds each layer the calibration tokens through the layers merged so far (the paper),
"base" through the pretrained model (the official code)). This class is the per-tensor specification:
``row_loss`` given → per-row trim, else plain TIES. There is no mergekit counterpart, so
``mergekit_compat`` changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import MergeMethod, ParamContext, ParamSpec


@dataclasses.dataclass(frozen=True)
class MTiesParams:
    weight: tuple[float, ...]
    density: tuple[float, ...]
    epsilon: float = 0.1
    normalize: bool = True
    lambda_: float = 1.0
    election: str = "sum"
    selection: str = "threshold"
    rescale: bool = False
    statistic: str = "sq"
    mode: str = "progressive"
    #: node M-Loss of this tensor's rows (set by the engine for target matrices), else None: plain TIES
    row_loss: tuple[float, ...] | None = None


class MTies(MergeMethod):
    name = "m_ties"
    paper_url = "https://arxiv.org/abs/2602.08564"
    base_policy = "required"
    tensor_free_params = True
    engine = "layerwise"  # the M-Loss needs forward passes through the merged layers
    params = (
        ParamSpec("weight", float, 1.0, per_model=True, doc="weight of the model's task vector (official: 1 each)"),
        ParamSpec("density", float, 0.8, per_model=True, doc="k: the largest row keep ratio, in (0, 1]"),
        ParamSpec("epsilon", float, 0.1, per_model=False, doc="e: row keep ratios span [density − e, density]"),
        ParamSpec("normalize", bool, True, per_model=False, doc="disjoint mean (divide by agreeing weights)"),
        ParamSpec("lambda", float, 1.0, per_model=False, doc="scale of the merged task vector"),
        ParamSpec("rescale", bool, False, per_model=False, doc="L1-rescale each trimmed task vector"),
        ParamSpec("int8_mask", bool, False, per_model=False, doc="accepted for mergekit-style configs; memory only"),
        ParamSpec("election", str, "sum", per_model=False, doc="sign election: sum or count", choices=("sum", "count")),
        ParamSpec("selection", str, "threshold", per_model=False, doc="trim: threshold (keep boundary ties) or topk",
                  choices=("threshold", "topk")),
        ParamSpec("calibration", str, "", per_model=False, doc="token ids (.npy / .pt, [N, T] or [T]) for the M-Loss"),
        ParamSpec("layers", str, "", per_model=False,
                  doc="layers using M-Loss ratios (few-layer variant): [8, 9, 10] or '8-10'; empty: all"),
        ParamSpec("statistic", str, "sq", per_model=False, doc="node M-Loss: sq (official), abs (Def. 3.4), norm (Def. 3.6)",
                  choices=("sq", "abs", "norm")),
        ParamSpec("mode", str, "progressive", per_model=False,
                  doc="layer inputs from the merged-so-far model (paper) or the base model (official code)",
                  choices=("progressive", "base")),
    )
    params_type = MTiesParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> MTiesParams:
        return MTiesParams(
            weight=tuple(per_model["weight"]), density=tuple(per_model["density"]), epsilon=shared["epsilon"],
            normalize=shared["normalize"], lambda_=shared["lambda"], election=shared["election"],
            selection=shared["selection"], rescale=shared["rescale"], statistic=shared["statistic"], mode=shared["mode"],
        )

    def check(self, params: MTiesParams, where: str) -> None:
        # inline (not fastmerge.mloss.mties.check_mties): planning must not import torch
        for i, d in enumerate(params.density):
            if not (0.0 < d <= 1.0):
                raise ConfigError(f"{where}: density of model #{i + 1} must be in (0, 1], got {d}")
            if not (0.0 <= params.epsilon <= d):
                raise ConfigError(f"{where}: epsilon must be in [0, density] (row keep ratios in [density − epsilon, "
                                  f"density]), got epsilon={params.epsilon}, density={d}")

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: MTiesParams, compat: bool = False
    ) -> torch.Tensor:
        from ..mloss.mties import m_ties_tensors

        if base is None:
            raise ConfigError("m_ties needs a base model")
        p = params
        row_loss = None if p.row_loss is None else torch.tensor(p.row_loss, dtype=torch.float64)
        return m_ties_tensors(inputs, base.float(), row_loss=row_loss, weight=p.weight, density=p.density,
                              epsilon=p.epsilon, normalize=p.normalize, lambda_=p.lambda_, election=p.election,
                              selection=p.selection, rescale=p.rescale)
