"""The hand-off between the engine and a backend: one output tensor's merge, fully resolved."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

from .._lazy import torch

from ..methods import MergeMethod


@dataclasses.dataclass(frozen=True)
class MergeJob:
    """What a backend needs to decide whether it can run a tensor (no tensor bytes)."""

    tensor: str
    method: MergeMethod
    params: Any
    compat: bool  # mergekit_compat: mergekit's native-dtype arithmetic
    numel: int | None = None  # the output's element count, where known (size-dependent choices: backends.select)


class Backend(Protocol):
    name: str

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        """Why this backend cannot run ``job`` on ``device``; [] if it can."""
        ...

    def run(
        self, job: MergeJob, out: torch.Tensor, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, threads: int
    ) -> None:
        """Merge into ``out`` (CPU, contiguous, output dtype). Inputs are read-only."""
        ...
