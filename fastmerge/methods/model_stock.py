"""Model Stock: move from the base towards the fine-tunes' average by an angle-derived ratio.

Paper: Jang et al., "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522

Per output tensor, with the base w₀ and N ≥ 2 fine-tunes w_i, δ_i = w_i − w₀:

    cos θ = mean over the N(N−1)/2 pairs i < j of clamp(⟨δ_i, δ_j⟩ / max(‖δ_i‖·‖δ_j‖, 1e-6), −1, 1)
    t     = N·cos θ / (1 + (N − 1)·cos θ)            (t = 0, i.e. the base, where |1 + (N−1)cos θ| < 1e-6)
    out   = t · (Σ_i w_i / N) + (1 − t) · w₀

``filter_wise: false`` (default): one cos θ for the whole flattened tensor. ``filter_wise: true``: one
per row (per slice along the last dimension; a 1-D tensor is one row). Identical task vectors give
cos θ = 1, t = 1: the fine-tunes' average; orthogonal ones cos θ = 0, t = 0: the base.

Numerics: mergekit 0.1.5 computes all of this in the compute dtype (bf16 rounds after every operation,
the norm and dot reductions included) and forms t·mean + (1 − t)·w₀ from the full-size tensors;
``mergekit_compat`` does the same operations in the same dtype. Default mode evaluates the same value
as out = w₀ + (t/N)·Σ_i δ_i: the cosines from an fp64 Gram matrix of the task vectors, t in fp64, then
one fp32 pass (``sphere.gram`` / ``sphere.combine``), one rounding. Working on the δ_i (small) rather
than on t·mean + (1 − t)·w₀ (large, cancelling) also avoids rounding at the scale of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import MergeMethod, ParamContext, ParamSpec, TritonKernel
from .sphere import combine, gram, to_rows


@dataclasses.dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False



def _triton_reasons(p: ModelStockParams) -> list[str]:
    if p.filter_wise:
        return ["model_stock filter_wise: true (a ratio per row) is in the torch backend only"]
    return []


class ModelStock(MergeMethod):
    name = "model_stock"
    triton = TritonKernel("model_stock:ModelStockKernel", reasons=_triton_reasons)
    paper_url = "https://arxiv.org/abs/2403.19522"
    base_policy = "required"
    tensor_free_params = True
    params = (ParamSpec("filter_wise", bool, False, per_model=False, doc="one ratio per row instead of per tensor"),)
    params_type = ModelStockParams
    min_models = 2

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> ModelStockParams:
        return ModelStockParams(filter_wise=shared["filter_wise"])

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: ModelStockParams, compat: bool = False
    ) -> torch.Tensor:
        if base is None or len(inputs) < 2:
            raise ConfigError(f"model_stock: needs a base and at least two other models, got {len(inputs)}")
        if compat:
            return _mergekit(inputs, base, params.filter_wise)
        # default: out = w₀ + (t/N)·Σ δ_i, t from the fp64 Gram matrix of the δ_i, one fp32 pass (sphere.py)
        flat = not params.filter_wise
        vs = [to_rows(x, flat) for x in inputs]
        b = to_rows(base, flat)
        g = gram(vs, b)  # [rows, N, N]
        n = len(inputs)
        norms = g.diagonal(dim1=1, dim2=2).sqrt()
        i, j = torch.triu_indices(n, n, offset=1)
        pair_cos = (g[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
        cos = pair_cos.mean(dim=1)
        den = 1 + (n - 1) * cos
        singular = den.abs() < 1e-6  # no finite ratio: keep the base
        t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den))
        coef = (t / n)[:, None].expand(-1, n)
        return combine(vs, coef, b).reshape(base.shape)


def _mergekit(inputs: Sequence[torch.Tensor], base: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """mergekit 0.1.5's evaluation, in the inputs' dtype: t·mean(x) + (1 − t)·w₀."""
    w0, ws = base, list(inputs)
    shape = w0.shape
    if not filter_wise:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    elif w0.dim() == 1:
        w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    deltas = [w - w0 for w in ws]
    norms = [torch.norm(d, dim=-1) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(den), den))
    mean = sum(ws) / n  # Python sum (0 + w_1 + ...), as mergekit: the same roundings in bf16
    return (t * mean + (1 - t) * w0).reshape(shape)
