"""The native CPU backend: fused C++ kernels (``fastmerge._C``) on raw buffers, GIL released.

Which methods it runs, with which arguments and which parameter values left to the reference, each method
declares (``MergeMethod.native``, a ``methods.base.NativeKernel``): linear, task_arithmetic, ties,
dare_*, della*, breadcrumbs*, sce, nearswap (t >= 1e-6), in default mode (fp32 math, one rounding), and
passthrough (a byte copy on raw views; a scale or a dtype change takes the reference).
``mergekit_compat`` (mergekit's arithmetic in the compute dtype) stays on the torch backend.

Importing this module imports neither torch nor the methods (only ``fastmerge._native``): the torch-free
engine (``engine.stream.RawIO``) may import it; ``run`` receives torch tensors, ``run_raw`` raw views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .. import _native

if TYPE_CHECKING:
    import torch

    from .base import MergeJob


class NativeBackend:
    name = "native"

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        reasons = []
        if not _native.HAS_CPU_EXT:
            reasons.append(f"fastmerge._C not loaded ({_native.LOAD_ERRORS.get('_C', 'not built')})")
        if device != "cpu":
            reasons.append("CPU only")
        kernel = job.method.native
        if kernel is None:
            reasons.append(f"no C++ kernel for '{job.method.name}'")
        if job.compat:
            reasons.append("mergekit_compat (mergekit's native-dtype arithmetic) is emulated by the torch backend only")
        if kernel is not None:
            reasons += kernel.reasons(job.params)
        return reasons

    def raw_reasons(self, job: MergeJob, tp: Any) -> list[str]:
        """Why ``run_raw`` (no torch) cannot merge planned tensor ``tp`` although ``run`` can ([] if it can)."""
        src = tp.sources[0] if tp.sources else tp.base
        return job.method.native.raw_reasons(job.params, src.dtype, tp.out_dtype)

    def run(
        self, job: MergeJob, out: torch.Tensor, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, threads: int
    ) -> None:
        """Merge into ``out`` (CPU, contiguous, the tensor's shape)."""
        job.method.native.run(job.method, job.params, out, inputs, base, threads, None)

    def run_raw(
        self, job: MergeJob, out: Any, inputs: Sequence[Any], base: Any | None, threads: int,
        shape: Sequence[int] | None = None,
    ) -> None:
        """``run`` on raw buffers, without torch: ``out``, ``inputs`` and ``base`` are views with ``ptr``
        (address), ``dtype`` ("float32" | "float16" | "bfloat16") and ``numel`` (``fastmerge.io.reader.RawView``);
        the caller guarantees the addresses. ``shape``: the tensor's shape (della ranks within its rows)."""
        try:
            job.method.native.run(job.method, job.params, out, inputs, base, threads, shape)
        except ValueError as e:
            raise ValueError(f"tensor '{job.tensor}': {e}") from None
