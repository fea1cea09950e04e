"""Passthrough: copy the single input tensor, optionally scaled (layer stacking with ``slices``).

No paper: mergekit's ``passthrough`` (used for "frankenmerges" that stack layer ranges of models).

    out = x · scale          (exactly one input; no base model: a configured one is ignored)

``scale`` is per model and per tensor (gradients and filters apply). mergekit's default is None,
"unchanged"; fastmerge's default is 1.0, which is the same bit for bit (x·1 = x exactly in IEEE
arithmetic, and the engine's only rounding is to the output dtype, as mergekit's cast). A filter list
without a fallback that matches nothing also leaves the tensor unchanged, in both tools.
Default mode: x·scale in fp32, rounded once to the output dtype (scale 1: x itself, no fp32 copy).
``mergekit_compat``: x·scale in the compute dtype (torch computes a bf16 or fp16 tensor times a scalar
in fp32 and rounds the product once, so the two modes give the same bits when the output dtype is the
compute dtype).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import MergeMethod, NativeKernel, ParamContext, ParamSpec, as_fp32


@dataclasses.dataclass(frozen=True)
class PassthroughParams:
    scale: tuple[float, ...] = (1.0,)



def copy_reasons(p: PassthroughParams, in_dtype: str, out_dtype: str) -> list[str]:
    """Why a passthrough tensor is not a plain byte copy ([]: it is)."""
    if p.scale[0] != 1:
        return [f"passthrough scale {p.scale[0]} (a multiply: the torch path)"]
    if in_dtype != out_dtype:
        return [f"passthrough {in_dtype} -> {out_dtype} (a conversion: the torch path)"]
    return []


def _native_run(method: Any, p: PassthroughParams, out: Any, inputs: Sequence[Any], base: Any, threads: int,
                shape: Any) -> None:
    """Raw views: a byte copy (``copy_reasons`` empty). Tensors: the reference (a copy or one multiply),
    which torch's ``copy_`` converts to the output dtype."""
    from .. import _native

    if not _native.is_raw(out):
        out.copy_(method.reference(inputs, None, p).reshape(out.shape))
        return
    why = copy_reasons(p, inputs[0].dtype, out.dtype)
    if why:
        raise ValueError(why[0])
    _native.copy(out, inputs[0])


class Passthrough(MergeMethod):
    name = "passthrough"
    native = NativeKernel(_native_run, raw_reasons=copy_reasons)
    base_as_input = True
    paper_url = "https://github.com/arcee-ai/mergekit"
    base_policy = "ignored"
    tensor_free_params = True
    params = (
        ParamSpec("scale", float, 1.0, per_model=True, doc="multiplier of the tensor (1: unchanged, mergekit's None)"),
    )
    params_type = PassthroughParams
    min_models = 1
    max_models = 1

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> PassthroughParams:
        return PassthroughParams(scale=tuple(per_model["scale"]))

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: PassthroughParams, compat: bool = False
    ) -> torch.Tensor:
        if len(inputs) != 1:  # configs are checked by min/max_models; this guards direct tensor calls
            raise ConfigError(f"passthrough takes exactly one model, got {len(inputs)}")
        s = params.scale[0]
        if s == 1:  # the identity is exact in any dtype: skip the fp32 round trip (3x the memory traffic)
            return inputs[0]
        return inputs[0] * s if compat else as_fp32(inputs[0]) * s
