"""The Triton backend (fused GPU kernels from ``fastmerge.kernels``).

No method has a Triton kernel in this release: the backend exists so ``--backend triton`` and
``fastmerge plan`` answer precisely why it is not used, instead of failing obscurely.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Sequence

import torch

from .base import MergeJob

KERNELS: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:  # asked once, not once per tensor (models have ~10k tensors)
    return importlib.util.find_spec("triton") is not None


class TritonBackend:
    name = "triton"

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        reasons = []
        if not _triton_installed():
            reasons.append("triton is not installed (pip install triton)")
        if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("needs a CUDA device (or TRITON_INTERPRET=1)")
        if job.method.name not in KERNELS:
            reasons.append(f"no Triton kernel for '{job.method.name}' yet")
        return reasons

    def run(self, job: MergeJob, out: torch.Tensor, inputs: Sequence[torch.Tensor], base, threads: int) -> None:
        raise AssertionError("guarded by not_supported_reasons")
