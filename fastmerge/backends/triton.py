"""The Triton backend: fused GPU kernels from ``fastmerge.kernels`` (and, with ``TRITON_INTERPRET=1``,
the same kernels interpreted on the CPU, for tests).

What the kernels cover (default mode, every parameter value unless listed):

| method | kernel | not covered (torch backend) |
|---|---|---|
| linear | one fused multiply-add pass | – (``mergekit_compat`` too: rounded to the inputs' dtype, then the output's) |
| task_arithmetic | ``gta`` fused pass | ``mergekit_compat`` |
| ties | 3 radix-select passes + ``gta`` (+ L1 pass with rescale; exact-k: + a tie count) | ``mergekit_compat`` |
| dare_linear, dare_ties | ``gta`` with counter-based masks (+ L1 pass with rescale) | ``mergekit_compat`` |
| breadcrumbs, breadcrumbs_ties | 3 two-query select passes + ``gta`` | ``selection: topk``, ``mergekit_compat`` |
| della, della_linear | torch row ranks + ``gta`` with rank-dependent masks | ``mergekit_compat`` |
| slerp | Gram pass + combine | ``mergekit_compat`` |
| model_stock | Gram pass over the task vectors + combine | ``filter_wise: true``, ``mergekit_compat`` |

``mergekit_compat`` reproduces mergekit's 16-bit arithmetic, argsort orders and chunked fp32 sums:
the torch reference does that, the kernels compute in fp32 with one rounding. Every covered case
equals the torch reference bit for bit (tests/kernels/), except where an L1 rescale ratio or a Gram
matrix is summed in another order (a few fp32 ulps in the ratio, rare 1-ulp flips of a 16-bit
output; see ``kernels.gta`` / ``kernels.sphere``).

Which methods, which parameter values, the batch key, scratch and chunking: each method declares its
kernel (``MergeMethod.triton``, a ``methods.base.TritonKernel``); this module reads the declarations.
Used per tensor by ``engine.stream`` (``run``: inputs on the CPU are copied to the GPU, merged, copied
back) and by batches of tensors and row chunks by ``engine.gpu`` (``make_kernel``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any, Sequence

from .._lazy import torch, torch_loaded
from ..kernels import interpreting
from ..methods import REGISTRY
from .base import MergeJob

#: methods with a kernel (the table above)
KERNELS: tuple[str, ...] = tuple(name for name, m in REGISTRY.items() if m.triton is not None)


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:  # asked once, not once per tensor (models have ~10k tensors)
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def _cuda() -> bool:
    return bool(torch.cuda.is_available())


def param_reasons(job: MergeJob) -> list[str]:
    """Why the kernels cannot merge ``job``'s method with its parameters ([] if they can)."""
    caps = job.method.triton
    if caps is None:
        return [f"no Triton kernel for '{job.method.name}'"]
    out = []
    if job.compat and not caps.compat:
        out.append("mergekit_compat (mergekit's native-dtype arithmetic) is emulated by the torch backend only")
    return out + caps.reasons(job.params)


@functools.lru_cache(maxsize=None)
def kernel_class(spec: str) -> Any:
    """The kernel plan class ``"<module>:<class>"`` of ``fastmerge.kernels`` (imports torch and triton)."""
    module, cls = spec.split(":")
    return getattr(importlib.import_module(f"fastmerge.kernels.{module}"), cls)


def batch_key(job: MergeJob) -> tuple:
    """Tensors of equal key can share one launch (their compile-time flags agree)."""
    return kernel_class(job.method.triton.kernel).key(job.method, job.params)


def make_kernel(
    method: Any, params: Sequence[Any], shapes: Sequence[Sequence[int]], device: Any,
    in_dtypes: Sequence[Any] | None = None, base_dtype: Any = None,
) -> Any:
    """The kernel plan of ``method`` for a batch of tensors (one ``params`` and whole-tensor ``shapes``
    entry each): an object with ``n_passes``, ``data_pass``, ``end_pass``, ``merge`` and ``run``
    (``kernels.gta.GtaKernel``'s interface). ``in_dtypes`` / ``base_dtype``: the original inputs' dtypes
    (before staging; DELLA ranks and model_stock combines at their precision)."""
    return kernel_class(method.triton.kernel).for_batch(method, params, shapes, device, in_dtypes, base_dtype)


def stage_dtype(dtypes: Sequence[Any]) -> Any:
    """One dtype for the packed rows: the inputs' own if they agree, else fp32 (every 16-bit value is
    exact in fp32, so nothing is rounded before the kernel)."""
    first = dtypes[0]
    return first if all(d == first for d in dtypes) else torch.float32


class TritonBackend:
    name = "triton"

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        reasons = []
        if not _triton_installed():
            reasons.append("triton is not installed (pip install triton)")
        elif not interpreting() and not self._gpu(device):
            reasons.append("needs a CUDA device (or TRITON_INTERPRET=1)")
        return reasons + param_reasons(job)

    @staticmethod
    def _gpu(device: str) -> bool:
        """A GPU to run on. ``device="cpu"`` (``merge_tensors``' CPU tensors) qualifies when CUDA is usable,
        asked only if torch is loaded already: planning a CPU merge must not import torch (the
        native fast path runs without it)."""
        if device == "cuda":
            return _cuda()
        return torch_loaded() and _cuda()

    def run(
        self, job: MergeJob, out: "torch.Tensor", inputs: Sequence["torch.Tensor"], base: "torch.Tensor | None",
        threads: int,
    ) -> None:
        """Merge one tensor: the inputs (any device) are packed into one [T, N] buffer on the GPU (the
        CPU under the interpreter), merged there, and the result copied into ``out``."""
        from fastmerge.kernels._common import Segments

        dev = torch.device("cuda") if (_cuda() and not interpreting()) else torch.device("cpu")
        shape = tuple(out.shape)
        n = out.numel()
        dtypes = [t.dtype for t in inputs] + ([] if base is None else [base.dtype])
        sd = stage_dtype(dtypes)
        x = torch.empty((len(inputs), n), dtype=sd, device=dev)
        for i, t in enumerate(inputs):
            x[i].copy_(t.reshape(-1), non_blocking=True)
        b = x[0] if base is None else base.reshape(-1).to(device=dev, dtype=sd)
        kernel = make_kernel(job.method, [job.params], [shape], dev, dtypes[: len(inputs)],
                             None if base is None else base.dtype)
        # mergekit_compat (a kernel that emulates it: TritonKernel.compat): mergekit rounds to the first
        # input's dtype, the engine then to the output's
        odt = inputs[0].dtype if job.compat else out.dtype
        o = torch.empty(n, dtype=odt, device=dev)
        kernel.run(x, b, o, Segments.packed([n], shapes=[shape]))
        out.copy_(o.view(shape))
