"""Arcee Fusion: take the fine-tune's changes where their importance is an outlier, the base elsewhere.

Reference: Arcee AI's ``arcee_fusion`` method (mergekit 0.1.5 cites https://arcee.ai; there is no paper).
Exactly one model besides the base. Per output tensor:

    δ    = x − base
    p    = softmax(x) + 1e-8,   q = softmax(base) + 1e-8      (over the last dim; a 1-D tensor is one row)
    kl   = Σ_j p_j · log(p_j / q_j)                           (one value per row, KL(p‖q))
    imp  = |δ| ⊙ kl                                           (kl broadcast along its row)
    Q(f) = the ⌊f·(n − 1)⌋-th smallest (0-based) of n values of imp (no interpolation, as mergekit)
    thr  = Q(0.5) + 1.5 · (Q(0.75) − Q(0.25))                 (median + 1.5·IQR)
    out  = base + [imp ≥ thr] · δ

Quantiles are exact (three ``torch.kthvalue`` selections, no sort) when imp has at most 1,000,000
elements, which matches mergekit exactly. Larger tensors use 1,000,000 samples drawn with replacement,
as mergekit does, but from OUR deterministic generator: a ``torch.Generator`` seeded with
``sample_seed(seed, key)`` (the run's ``seed`` and the stable hash of the tensor name), so a merge is
reproducible whatever the tensor order or thread count. mergekit draws from torch's global RNG, which
no other program can replay, so above 1e6 elements the threshold (and a few mask entries) differ from
any given mergekit run in both modes.

Output dtype: mergekit 0.1.5 multiplies δ by a float32 mask, so with ``dtype: bfloat16`` it writes
float32 tensors (its bug, mergekit issue #604). fastmerge writes ``out_dtype`` / ``dtype`` as the config
asks, in both modes; in compat mode the values are mergekit's rounded to that dtype.
Default mode: fp32 math (softmax, KL, quantiles, threshold). ``mergekit_compat``: every step up to the
mask in the compute dtype (bf16 softmax, KL and threshold), then ``base + δ·mask`` in float32. With bf16
the two differ much more than by rounding: bf16 resolves p/q ≈ 1 only to 2^-8 below 1, 2^-7 above, so
mergekit's row KL is rounding noise (~1e-4, sometimes negative, where the fp32 KL of fine-tune-sized
changes is ~2e-6) and ~19% of a q_proj mask differs from the fp32 one; ``dtype: float32`` gives a
meaningful importance in both tools.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from .base import MergeMethod, ParamContext

SAMPLE_SIZE = 1_000_000
EPS = 1e-8  # added to both softmaxes before the log, as mergekit
IQR_FACTOR = 1.5


@dataclasses.dataclass(frozen=True)
class ArceeFusionParams:
    seed: int = 0
    key: int = 0  # stable hash of the tensor name (ParamContext.key)


def sample_seed(seed: int, key: int) -> int:
    """The sampler's generator seed: (seed, key) mixed by a 64-bit multiply (golden-ratio constant),
    reduced to 63 bits (``torch.Generator.manual_seed`` takes any non-negative int below 2**64)."""
    return ((seed * 0x9E3779B97F4A7C15) ^ key) & ((1 << 63) - 1)


def importance(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|x − b| scaled by the row-wise KL(softmax(x) ‖ softmax(b)), in the inputs' dtype."""
    p = torch.nn.functional.softmax(x, dim=-1) + EPS
    q = torch.nn.functional.softmax(b, dim=-1) + EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x - b).abs() * kl


def quartiles(values: torch.Tensor, params: ArceeFusionParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, median, Q3): order statistics at ⌊f·(n−1)⌋ of the values, or of 1e6 deterministic samples."""
    flat = values.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        g = torch.Generator().manual_seed(sample_seed(params.seed, params.key))
        idx = torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=g)  # with replacement, on the CPU
        flat = flat[idx.to(flat.device)]
    last = flat.numel() - 1
    # ⌊f·last⌋ for f = 1/4, 1/2, 3/4 in integers (mergekit's fp32 product is exact below 2**24 / 3)
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in (last // 4, last // 2, 3 * last // 4))
    return q1, median, q3


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    paper_url = "https://arcee.ai"
    base_policy = "required"
    params = ()
    params_type = ArceeFusionParams
    min_models = 1
    max_models = 1

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> ArceeFusionParams:
        return ArceeFusionParams(seed=ctx.seed, key=ctx.key)

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: ArceeFusionParams, compat: bool = False
    ) -> torch.Tensor:
        assert base is not None
        if len(inputs) != 1:  # configs are checked by min/max_models; this guards direct tensor calls
            raise ConfigError(f"arcee_fusion takes exactly one model besides the base, got {len(inputs)}")
        dt = base.dtype if compat else torch.float32
        x, b = inputs[0].to(dt), base.to(dt)
        imp = importance(x, b)
        q1, median, q3 = quartiles(imp, params)
        threshold = median + IQR_FACTOR * (q3 - q1)  # 0-dim tensors: rounded in dt, as mergekit
        keep = (imp >= threshold).to(torch.float32)
        # compat: δ in dt times a float32 mask promotes to float32, so mergekit's result is float32
        return b + (x - b) * keep
