"""NearSwap: take the other model's value where it is close to the base, keep the base where they differ.

Reference: alchemonaut, "QuartetAnemoi-70B-t0.0001" (the model card that introduced it),
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (no arXiv paper)

Per element, with the base b, the other model x and the threshold t:

    w   = clamp(t / max(|b − x|, 1e-6), 0, 1)
    out = w·x + (1 − w)·b

Where |b − x| ≤ t the weight is 1 (out = x); farther apart it falls off as t/|b − x|. Equal elements
(|b − x| = 0) divide by the 1e-6 floor instead of 0, so w = min(t·1e6, 1). t ≤ 0 gives the base.
Since w·x + (1 − w)·b = b + w·(x − b), for t ≥ 1e-6 this is exactly

    out = b + clamp(x − b, −t, t) = clamp(x, b − t, b + t)     (x, moved at most t away from the base)

Numerics: mergekit 0.1.5 computes the first form in the compute dtype (bf16 rounds after every
operation; torch evaluates ``t / tensor`` as ``reciprocal(tensor)·t``, two roundings);
``mergekit_compat`` does the same operations in the same dtype. Default mode evaluates
clamp(x, b − t, b + t) in fp32: x itself where |x − b| ≤ t, b ± t (one rounding) beyond; three passes
instead of ten. (For t < 1e-6 it evaluates b + w·(x − b) in fp32.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import REQUIRED, MergeMethod, NativeKernel, ParamContext, ParamSpec, as_fp32

#: floor of |b − x| before dividing by it (mergekit's value)
DIFF_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class NearswapParams:
    t: float



def _native_run(method: Any, p: NearswapParams, out: Any, inputs: Sequence[Any], base: Any, threads: int, shape: Any) -> None:
    from .. import _native

    _native.nearswap(out, inputs[0], base, p.t, threads)


def _native_reasons(p: NearswapParams) -> list[str]:
    if not p.t >= DIFF_FLOOR:
        return [f"nearswap t < {DIFF_FLOOR} (the weighted form) is in the torch backend only"]
    return []


class Nearswap(MergeMethod):
    name = "nearswap"
    #: the kernel covers the clamp form (t >= DIFF_FLOOR)
    native = NativeKernel(_native_run, reasons=_native_reasons)
    paper_url = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    base_policy = "required"
    tensor_free_params = True
    params = (ParamSpec("t", float, REQUIRED, per_model=False, doc="distance below which the other model's value is taken"),)
    params_type = NearswapParams
    min_models = 1
    max_models = 1

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> NearswapParams:
        return NearswapParams(t=shared["t"])

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: NearswapParams, compat: bool = False
    ) -> torch.Tensor:
        if base is None or len(inputs) != 1:
            raise ConfigError(f"nearswap: needs a base and exactly one other model, got {len(inputs)} other model(s)")
        if compat:
            b, x = base, inputs[0]
            w = (params.t / torch.abs(b - x).clamp(min=DIFF_FLOOR)).clamp(min=0, max=1)
            return w * x + (1 - w) * b
        # default, fp32: where t ≥ 1e-6, w·x + (1 − w)·b = b + clamp(x − b, −t, t) = clamp(x, b − t, b + t),
        # which returns x itself (no arithmetic) where |x − b| ≤ t
        x, t = inputs[0], params.t
        if t >= DIFF_FLOOR:
            # clamp = min(max(x, b − t), b + t), in place in the b − t buffer: two fp32 allocations (each
            # fresh 4-byte-per-element tensor costs page faults), x read in its own dtype
            if base.dtype == torch.float32:
                lo, hi = base - t, base + t
            else:
                lo = base.float()
                hi = lo + t
                lo.sub_(t)
            return torch.minimum(torch.maximum(lo, x, out=lo), hi, out=lo)
        b = as_fp32(base)
        d = as_fp32(x) - b
        w = (params.t / d.abs().clamp(min=DIFF_FLOOR)).clamp_(min=0, max=1)
        return w.mul_(d).add_(b)
