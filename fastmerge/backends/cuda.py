"""The CUDA C++ backend (``fastmerge._C_cuda``).

The extension is built when nvcc is found and reports driver availability at run time; the engine does
not dispatch merges to it yet, and says so.
"""

from __future__ import annotations

from typing import Sequence

from .._lazy import torch

from .. import _native
from .base import MergeJob


class CudaBackend:
    name = "cuda"

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        ok, why = _native.cuda_usable()
        reasons = [] if ok else [why]
        if device != "cuda":
            reasons.append("needs --device cuda")
        reasons.append(f"the engine does not dispatch '{job.method.name}' to CUDA C++ kernels yet")
        return reasons

    def run(self, job: MergeJob, out: torch.Tensor, inputs: Sequence[torch.Tensor], base, threads: int) -> None:
        raise AssertionError("guarded by not_supported_reasons")
