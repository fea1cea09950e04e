"""Linear merge ("model soups"): a weighted average of the input models.

Paper: Wortsman et al., "Model soups", https://arxiv.org/abs/2203.05482

    out = Σ_i w_i·x_i / Σ_i w_i        (normalize=true, the default)
    out = Σ_i w_i·x_i                   (normalize=false)

fp32 accumulation in input order with a fused multiply-add per model (``addcmul_``, one rounding per
step), one division, one rounding to the output dtype. mergekit 0.1.5 computes exactly this, so both
modes agree with it bit for bit; rounding ``w·x`` before adding would differ on ~9% of fp32 outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, NativeKernel, ParamContext, ParamSpec, TritonKernel, as_fp32, round_fp32


@dataclasses.dataclass(frozen=True)
class LinearParams:
    weight: tuple[float, ...]
    normalize: bool = True


def weight_divisor(weight: Sequence[float], normalize: bool) -> float | None:
    """The fp32 sum of the weights (summed in order, as the kernels do), or None without normalize."""
    if not normalize:
        return None
    acc = 0.0
    for w in weight:
        # fp32 addition without torch (the fast path never imports it): the double sum of two fp32
        # values is exact or off only below fp32's sticky bit, so one rounding to fp32 is fp32's sum.
        acc = round_fp32(acc + round_fp32(w))
    return acc



def _native_run(method: Any, p: LinearParams, out: Any, inputs: Sequence[Any], base: Any, threads: int, shape: Any) -> None:
    from .. import _native

    # a base given to linear is ignored, as in mergekit
    _native.weighted_delta_sum(out, inputs, None, p.weight, weight_divisor(p.weight, p.normalize), 1.0, threads)


class Linear(MergeMethod):
    name = "linear"
    native = NativeKernel(_native_run, elementwise=True)
    triton = TritonKernel("linear:LinearKernel", compat=True)
    base_as_input = True
    paper_url = "https://arxiv.org/abs/2203.05482"
    base_policy = "ignored"
    tensor_free_params = True
    params = (
        ParamSpec("weight", float, REQUIRED, per_model=True, doc="mixing weight of the model"),
        ParamSpec("normalize", bool, True, per_model=False, doc="divide by the sum of the weights"),
    )
    params_type = LinearParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> LinearParams:
        return LinearParams(weight=tuple(per_model["weight"]), normalize=shared["normalize"])

    def check(self, params: LinearParams, where: str) -> None:
        if params.normalize and weight_divisor(params.weight, True) == 0.0:
            raise ConfigError(f"{where}: weights sum to 0 with normalize: true (division by zero)")

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: LinearParams, compat: bool = False
    ) -> torch.Tensor:
        acc = torch.zeros(inputs[0].shape, dtype=torch.float32, device=inputs[0].device)
        for x, w in zip(inputs, params.weight):
            acc.addcmul_(as_fp32(x), torch.tensor(w, dtype=torch.float32))  # fused: a*b + c, one rounding
        div = weight_divisor(params.weight, params.normalize)
        if div is not None:
            acc = acc / torch.tensor(div, dtype=torch.float32)
        # mergekit 0.1.5 also accumulates in fp32 and casts back to the first input's dtype
        return acc.to(inputs[0].dtype) if compat else acc
