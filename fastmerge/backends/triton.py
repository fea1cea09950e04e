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

Used per tensor by ``fastmerge.runner`` (``run``: inputs on the CPU are copied to the GPU, merged,
copied back) and by batches of tensors and row chunks by ``fastmerge.gpu_runner`` (``make_kernel``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Sequence

from .._lazy import torch, torch_loaded
from .base import MergeJob

#: methods with a kernel (the table above)
KERNELS: tuple[str, ...] = (
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "model_stock",
)


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:  # asked once, not once per tensor (models have ~10k tensors)
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _cuda() -> bool:
    return bool(torch.cuda.is_available())


def param_reasons(job: MergeJob) -> list[str]:
    """Why the kernels cannot merge ``job``'s method with its parameters ([] if they can)."""
    name = job.method.name
    if name not in KERNELS:
        return [f"no Triton kernel for '{name}'"]
    out = []
    if job.compat and name != "linear":
        out.append("mergekit_compat (mergekit's native-dtype arithmetic) is emulated by the torch backend only")
    if name.startswith("breadcrumbs") and getattr(job.params, "selection", "threshold") != "threshold":
        out.append("breadcrumbs selection 'topk' (exact count at both band edges) is in the torch backend only")
    if name == "model_stock" and getattr(job.params, "filter_wise", False):
        out.append("model_stock filter_wise: true (a ratio per row) is in the torch backend only")
    return out


def batch_key(job: MergeJob) -> tuple:
    """Tensors of equal key can share one launch (their compile-time flags agree)."""
    p = job.params
    name = job.method.name
    if name == "linear":
        return (name, p.normalize, job.compat)
    if name == "task_arithmetic":
        return (name, p.normalize)
    if name == "ties":
        return (name, p.election, p.normalize, p.rescale, p.selection)
    if name in ("dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties"):
        return (name, p.normalize, p.rescale)
    return (name,)


def make_kernel(
    method: Any, params: Sequence[Any], shapes: Sequence[Sequence[int]], device: Any, *,
    key_dtype: Any = None, direct: bool | None = None,
) -> Any:
    """The kernel plan of ``method`` for a batch of tensors (one ``params`` and whole-tensor ``shapes``
    entry each): an object with ``n_passes``, ``data_pass``, ``end_pass``, ``merge`` and ``run``
    (``kernels.gta.GtaKernel``'s interface). ``key_dtype``: DELLA's ranking precision per model;
    ``direct``: model_stock's 16-bit combine form (both from the original inputs' dtypes)."""
    from fastmerge.kernels import breadcrumbs, dare, della, linear, model_stock, slerp, ties

    name = method.name
    numels = [_numel(s) for s in shapes]
    consensus = getattr(method, "consensus", None)
    if name == "linear":
        return linear.LinearKernel(params, numels, device)
    if name == "task_arithmetic":
        return linear.TaskArithmeticKernel(params, numels, device)
    if name == "ties":
        return ties.TiesKernel(params, numels, device)
    if name in ("dare_linear", "dare_ties"):
        return dare.DareKernel(params, numels, device, consensus)
    if name in ("breadcrumbs", "breadcrumbs_ties"):
        return breadcrumbs.BreadcrumbsKernel(params, numels, device, consensus)
    if name in ("della", "della_linear"):
        return della.DellaKernel(params, shapes, device, consensus, key_dtype)
    if name == "slerp":
        return slerp.SlerpKernel(params, numels, device)
    if name == "model_stock":
        return model_stock.ModelStockKernel(params, numels, device, direct)
    raise AssertionError(name)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def stage_dtype(dtypes: Sequence[Any]) -> Any:
    """One dtype for the packed rows: the inputs' own if they agree, else fp32 (every 16-bit value is
    exact in fp32, so nothing is rounded before the kernel)."""
    first = dtypes[0]
    return first if all(d == first for d in dtypes) else torch.float32


def della_key_dtypes(dtypes: Sequence[Any], base_dtype: Any) -> list[Any]:
    """``methods.della.rank_dtype`` per model from the original dtypes."""
    sixteen = (torch.bfloat16, torch.float16)
    return [d if d == base_dtype and d in sixteen else torch.float32 for d in dtypes]


def is_direct(dtypes: Sequence[Any], base_dtype: Any) -> bool:
    """model_stock's 16-bit combine form (``methods.sphere.combine``): every input 16-bit."""
    return all(d in (torch.bfloat16, torch.float16) for d in (*dtypes, base_dtype))


class TritonBackend:
    name = "triton"

    def not_supported_reasons(self, job: MergeJob, device: str) -> list[str]:
        reasons = []
        if not _triton_installed():
            reasons.append("triton is not installed (pip install triton)")
        elif not _interpreting() and not self._gpu(device):
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

        dev = torch.device("cuda") if (_cuda() and not _interpreting()) else torch.device("cpu")
        name = job.method.name
        shape = tuple(out.shape)
        n = out.numel()
        dtypes = [t.dtype for t in inputs] + ([] if base is None else [base.dtype])
        sd = stage_dtype(dtypes)
        x = torch.empty((len(inputs), n), dtype=sd, device=dev)
        for i, t in enumerate(inputs):
            x[i].copy_(t.reshape(-1), non_blocking=True)
        b = x[0] if base is None else base.reshape(-1).to(device=dev, dtype=sd)
        kernel = make_kernel(
            job.method, [job.params], [shape], dev,
            key_dtype=della_key_dtypes(dtypes[: len(inputs)], base.dtype) if base is not None and name.startswith("della") else None,
            direct=is_direct(dtypes[: len(inputs)], base.dtype) if base is not None and name == "model_stock" else None,
        )
        # linear + mergekit_compat: mergekit rounds to the first input's dtype, the engine then to the output's
        odt = inputs[0].dtype if (job.compat and name == "linear") else out.dtype
        o = torch.empty(n, dtype=odt, device=dev)
        kernel.run(x, b, o, Segments.packed([n], shapes=[shape]))
        out.copy_(o.view(shape))
