"""Task arithmetic: add a weighted sum of task vectors (x_i − base) to the base model.

Paper: Ilharco et al., "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089

    out = base + λ · Σ_i w_i·(x_i − base) [/ Σ_i w_i  if normalize]

Default mode: fp32 math, one rounding. ``mergekit_compat``: mergekit 0.1.5's arithmetic, where the
deltas, the weighted deltas and their sum are all computed in the compute dtype (bf16 rounds at each
step), which is what makes its bf16 output differ from the fp32 result on ~9% of elements.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, NativeKernel, ParamContext, ParamSpec, TritonKernel, as_fp32
from .linear import weight_divisor


@dataclasses.dataclass(frozen=True)
class TaskArithmeticParams:
    weight: tuple[float, ...]
    normalize: bool = False
    lambda_: float = 1.0


def compat_finish(
    base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None, normalize: bool, lam: float
) -> torch.Tensor:
    """mergekit 0.1.5's generalized-task-arithmetic tail, in the deltas' dtype.

    ``deltas`` are the already weighted deltas [T, ...]; ``mask`` the consensus mask (None: plain sum)."""
    if mask is not None:
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


def compat_weights(weight: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights as mergekit builds them: a tensor in the compute dtype (0.33 becomes bf16 0.330078125)."""
    w = torch.tensor(list(weight), dtype=like.dtype, device=like.device)
    return w.reshape((-1,) + (1,) * (like.dim() - 1))



def _native_run(
    method: Any, p: TaskArithmeticParams, out: Any, inputs: Sequence[Any], base: Any, threads: int, shape: Any
) -> None:
    from .. import _native

    _native.weighted_delta_sum(out, inputs, base, p.weight, weight_divisor(p.weight, p.normalize), p.lambda_, threads)


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    native = NativeKernel(_native_run, elementwise=True)
    triton = TritonKernel("linear:TaskArithmeticKernel")
    paper_url = "https://arxiv.org/abs/2212.04089"
    base_policy = "required"
    tensor_free_params = True
    params = (
        ParamSpec("weight", float, REQUIRED, per_model=True, doc="scale of the model's task vector"),
        ParamSpec("density", float, 1.0, per_model=True, doc="accepted for mergekit configs; unused"),
        ParamSpec("normalize", bool, False, per_model=False, doc="divide by the sum of the weights"),
        ParamSpec("lambda", float, 1.0, per_model=False, doc="scale of the merged task vector"),
        ParamSpec("rescale", bool, False, per_model=False, doc="accepted for mergekit configs; no effect without sparsification"),
        ParamSpec("int8_mask", bool, False, per_model=False, doc="accepted for mergekit configs; memory only"),
    )
    params_type = TaskArithmeticParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> TaskArithmeticParams:
        return TaskArithmeticParams(
            weight=tuple(per_model["weight"]), normalize=shared["normalize"], lambda_=shared["lambda"]
        )

    def check(self, params: TaskArithmeticParams, where: str) -> None:
        if params.normalize and weight_divisor(params.weight, True) == 0.0:
            raise ConfigError(f"{where}: weights sum to 0 with normalize: true (division by zero)")

    def reference(
        self,
        inputs: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        params: TaskArithmeticParams,
        compat: bool = False,
    ) -> torch.Tensor:
        assert base is not None
        if compat:
            deltas = torch.stack([x - base for x in inputs])
            w = compat_weights(params.weight, deltas)
            return compat_finish(base, deltas * w, w, None, params.normalize, params.lambda_)
        b = as_fp32(base)
        acc = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        for x, w in zip(inputs, params.weight):
            acc = acc + torch.tensor(w, dtype=torch.float32) * (as_fp32(x) - b)
        div = weight_divisor(params.weight, params.normalize)
        if div is not None:
            acc = acc / torch.tensor(div, dtype=torch.float32)
        if params.lambda_ != 1:
            acc = acc * torch.tensor(params.lambda_, dtype=torch.float32)
        return b + acc
