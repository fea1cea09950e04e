"""The torch backend: runs each method's ``reference`` (the specification). Always available."""

from __future__ import annotations

from typing import Sequence

from .._lazy import torch

from .base import MergeJob


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu"):
        self.device = device

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        return []

    def run(
        self,
        job: MergeJob,
        out: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        threads: int,
        device: str = "cpu",
    ) -> None:
        if device != "cpu":
            inputs = [x.to(device, non_blocking=True) for x in inputs]
            base = None if base is None else base.to(device, non_blocking=True)
        res = job.method.reference(inputs, base, job.params, compat=job.compat)
        out.copy_(res.reshape(out.shape))  # one rounding (round-to-nearest-even) to the output dtype
