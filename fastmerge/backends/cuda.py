"""The CUDA C++ backend (``fastmerge._C_cuda``): methods whose native kernel declares CUDA (ties).

Measured on an H100 (bench/RESULTS.md, 2026-11-24): the CUDA C++ TIES kernel (``csrc/cuda/ties.cu``:
shared-memory radix-select histograms, then the fused merge pass) runs whole ties, selection included,
9.1-12.1x faster than the Triton kernels (whose selection passes reach only 60-80 GB/s), bit-exact with
the torch reference (``tests/native/test_native_ties.py::test_cuda_ties_matches_reference``). So it is
the default for ties on a GPU, and Triton stays as the check (``--backend triton``) and the path for
batches of small tensors and row-chunked ones (``engine.gpu``). Which methods: ``MergeMethod.native.cuda``.
"""

from __future__ import annotations

from typing import Sequence

from .._lazy import torch, torch_loaded

from .. import _native
from .base import MergeJob

#: inputs a launch takes (``_C_cuda.max_inputs``)
MAX_INPUTS = 32
#: under this many elements ``--backend auto`` leaves tensors to Triton, which batches small tensors
#: into one launch; the CUDA kernel takes one tensor per call (~10 launches).
#: ``backends.select`` applies it (the plan names where a tensor runs; ``engine.gpu`` follows the plan).
MIN_ELEMS = 1 << 20


def scratch_bytes(n: int, num_inputs: int) -> int:
    """Device scratch of one CUDA C++ ties call on ``n`` elements and ``num_inputs`` models, taken from torch's
    allocator by ``_native.ties`` and counted in the GPU engine's budget (``engine.gpu._Budget``): the layout of
    ``csrc/cuda/ties.cu`` (``ties_scratch_bytes``, which the binding checks the buffer against), asked of the
    extension where it is loaded, else bounded from above: histograms + NaN counts (2049 u64 per model), tie
    counts per 4096-element chunk (u32 per model), the device-decided state (< 4 KiB), per-block L1 norms
    (≤ 4096 blocks of 256 threads × 2 f64 per model), each part 256-byte aligned."""
    if n <= 0:
        return 0
    if _native.HAS_CUDA_EXT:
        return int(_native._C_cuda.ties_scratch_bytes(int(n), int(num_inputs)))
    chunks = -(-n // 4096)
    grid = min(max(-(-n // 256), 1), 4096)
    return num_inputs * 2049 * 8 + num_inputs * chunks * 4 + 4096 + grid * num_inputs * 2 * 8 + 5 * 256


def param_reasons(job: MergeJob) -> list[str]:
    """Why the CUDA C++ kernels cannot merge ``job``'s method with its parameters ([] if they can)."""
    kernel = job.method.native
    if kernel is None or not kernel.cuda:
        return [f"no CUDA C++ kernel for '{job.method.name}'"]
    out = []
    if job.compat:
        out.append("mergekit_compat (mergekit's native-dtype arithmetic) is emulated by the torch backend only")
    if len(job.params.weight) > MAX_INPUTS:
        out.append(f"{len(job.params.weight)} models: the CUDA kernel takes at most {MAX_INPUTS}")
    return out + kernel.reasons(job.params)


def run_into(job: MergeJob, out: "torch.Tensor", inputs: Sequence["torch.Tensor"], base: "torch.Tensor") -> None:
    """``job`` on CUDA tensors (flat, contiguous), into ``out`` (flat, CUDA, output dtype)."""
    if out.numel() == 0:
        return
    job.method.native.run(job.method, job.params, out, list(inputs), base, 0, None)


class CudaBackend:
    name = "cuda"

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        ok, why = _native.cuda_usable()
        reasons = [] if ok else [why]
        # merge_tensors' CPU tensors qualify when torch (already loaded: planning a CPU merge must not
        # import it) sees a GPU, as for the Triton backend
        if device != "cuda" and not (torch_loaded() and torch.cuda.is_available()):
            reasons.append("needs --device cuda")
        return reasons + param_reasons(job)

    def run(self, job: MergeJob, out: torch.Tensor, inputs: Sequence[torch.Tensor], base, threads: int) -> None:
        """One tensor: inputs (any device) moved to the GPU as they are, merged, copied into ``out``."""
        dev = torch.device("cuda")
        xs = [t.reshape(-1).to(dev).contiguous() for t in inputs]
        b = base.reshape(-1).to(dev).contiguous()
        o = torch.empty(out.numel(), dtype=out.dtype, device=dev)
        run_into(job, o, xs, b)
        out.copy_(o.view(out.shape))
