"""The native CPU backend: fused C++ kernels (``fastmerge._C``) on raw buffers, GIL released."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _native
from ..methods.linear import weight_divisor
from .base import MergeJob

KERNELS = ("linear", "task_arithmetic", "ties")


class NativeBackend:
    name = "native"

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        reasons = []
        if not _native.HAS_CPU_EXT:
            reasons.append(f"fastmerge._C not loaded ({_native.LOAD_ERRORS.get('_C', 'not built')})")
        if device != "cpu":
            reasons.append("CPU only")
        if job.method.name not in KERNELS:
            reasons.append(f"no C++ kernel for '{job.method.name}'")
        if job.compat:
            reasons.append("mergekit_compat (mergekit's native-dtype arithmetic) is emulated by the torch backend only")
        if job.method.name == "ties" and getattr(job.params, "rescale", False):
            reasons.append("ties rescale: true is not in the C++ kernel")
        return reasons

    def run(
        self, job: MergeJob, out: torch.Tensor, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, threads: int
    ) -> None:
        p = job.params
        name = job.method.name
        if name == "linear":
            _native.weighted_delta_sum(out, inputs, None, p.weight, weight_divisor(p.weight, p.normalize), 1.0, threads)
        elif name == "task_arithmetic":
            div = weight_divisor(p.weight, p.normalize)
            _native.weighted_delta_sum(out, inputs, base, p.weight, div, p.lambda_, threads)
        elif name == "ties":
            _native.ties(
                out, inputs, base, p.weight, p.density, p.normalize, p.lambda_, p.election,
                p.selection == "topk", threads,
            )
        else:  # guarded by not_supported_reasons
            raise AssertionError(name)
