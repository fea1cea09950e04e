"""The native CPU backend: fused C++ kernels (``fastmerge._C``) on raw buffers, GIL released.

Kernels: linear, task_arithmetic, ties (rescale included), dare_linear, dare_ties, della, della_linear,
breadcrumbs, breadcrumbs_ties, sce, nearswap (t >= 1e-6), in default mode (fp32 math, one rounding);
passthrough is a byte copy
(``run_raw``; a scale or a dtype change takes the reference). ``mergekit_compat`` (mergekit's arithmetic
in the compute dtype) stays on the torch backend.

Importing this module imports neither torch nor the methods (only ``fastmerge._native``): the engine's
torch-free fast path may import it; ``run`` receives torch tensors, so torch is loaded by then anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .. import _native

if TYPE_CHECKING:
    import torch

    from .base import MergeJob

#: method name -> the C++ kernel that runs it
KERNELS = {
    "linear": "weighted_delta_sum",
    "task_arithmetic": "weighted_delta_sum",
    "ties": "ties",
    "dare_linear": "dare",
    "dare_ties": "dare",
    "della": "della",
    "della_linear": "della",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs",
    "sce": "sce",
    "nearswap": "nearswap",  # t >= 1e-6 (the clamp form)
    "passthrough": "memmove",  # a byte copy on the fast path when nothing changes (no scale, no dtype change)
}


def passthrough_reason(scale: float, in_dtype: str, out_dtype: str) -> str | None:
    """Why a passthrough tensor is not a plain byte copy (None: it is)."""
    if scale != 1:
        return f"passthrough scale {scale} (a multiply: the torch path)"
    if in_dtype != out_dtype:
        return f"passthrough {in_dtype} -> {out_dtype} (a conversion: the torch path)"
    return None


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
        if job.method.name == "nearswap" and not job.params.t >= _native.NEARSWAP_MIN_T:
            reasons.append(f"nearswap t < {_native.NEARSWAP_MIN_T} (the weighted form) is in the torch backend only")
        return reasons

    def raw_reasons(self, job: MergeJob, tp: Any) -> list[str]:
        """Why ``run_raw`` (no torch) cannot merge planned tensor ``tp`` although ``run`` can ([] if it can)."""
        if job.method.name == "passthrough":
            src = tp.sources[0] if tp.sources else tp.base
            why = passthrough_reason(job.params.scale[0], src.dtype, tp.out_dtype)
            return [why] if why is not None else []
        return []

    def run(
        self, job: MergeJob, out: torch.Tensor, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, threads: int
    ) -> None:
        """Merge into ``out`` (CPU, contiguous, the tensor's shape) through the checked typed wrappers."""
        p = job.params
        name = job.method.name
        consensus = getattr(job.method, "consensus", None)  # the sparsifiers' consensus: fixed per method
        if name in ("linear", "task_arithmetic"):
            from ..methods.linear import weight_divisor

            div = weight_divisor(p.weight, p.normalize)
            if name == "linear":
                _native.weighted_delta_sum(out, inputs, None, p.weight, div, 1.0, threads)
            else:
                _native.weighted_delta_sum(out, inputs, base, p.weight, div, p.lambda_, threads)
        elif name == "ties":
            _native.ties(
                out, inputs, base, p.weight, p.density, p.normalize, p.lambda_, p.election,
                p.selection == "topk", threads, p.rescale,
            )
        elif name in ("dare_linear", "dare_ties"):
            _native.dare(
                out, inputs, base, p.weight, p.density, consensus, p.normalize, p.lambda_, p.rescale, p.seed, p.key,
                threads,
            )
        elif name in ("della", "della_linear"):
            _native.della(
                out, inputs, base, p.weight, p.density, p.epsilon, consensus, p.normalize, p.lambda_, p.rescale,
                p.seed, p.key, threads,
            )
        elif name in ("breadcrumbs", "breadcrumbs_ties"):
            _native.breadcrumbs(
                out, inputs, base, p.weight, p.density, p.gamma, consensus, p.normalize, p.lambda_, p.rescale,
                p.selection == "topk", threads,
            )
        elif name == "sce":
            _native.sce(out, inputs, base, p.select_topk, threads)
        elif name == "nearswap":
            _native.nearswap(out, inputs[0], base, p.t, threads)
        elif name == "passthrough":  # the reference is a copy (scale 1) or one multiply; torch's copy_ converts
            out.copy_(job.method.reference(inputs, None, p).reshape(out.shape))
        else:  # guarded by not_supported_reasons
            raise AssertionError(name)

    def run_raw(
        self, job: MergeJob, out: Any, inputs: Sequence[Any], base: Any | None, threads: int,
        shape: Sequence[int] | None = None,
    ) -> None:
        """``run`` on raw buffers, without torch (the fast path): ``out``, ``inputs`` and ``base`` are views
        with ``ptr`` (address), ``dtype`` ("float32" | "float16" | "bfloat16") and ``numel``
        (``fastmerge.io.reader.RawView``). The caller guarantees the addresses. ``shape`` (or an ``out.shape``
        attribute): the tensor's shape, needed by della / della_linear only (it defines the ranked rows)."""
        p = job.params
        name = job.method.name
        consensus = getattr(job.method, "consensus", None)
        codes = _native.DTYPE_CODES
        n = int(out.numel)
        for i, v in enumerate(inputs):
            if int(v.numel) != n:
                raise ValueError(f"tensor '{job.tensor}': input {i} has {v.numel} elements, the output {n}")
        if base is not None and int(base.numel) != n:
            raise ValueError(f"tensor '{job.tensor}': the base has {base.numel} elements, the output {n}")
        common = (
            out.ptr, codes[out.dtype], n, [v.ptr for v in inputs], [codes[v.dtype] for v in inputs],
            0 if base is None else base.ptr, 0 if base is None else codes[base.dtype],
        )
        if name in ("linear", "task_arithmetic"):
            from ..methods.linear import weight_divisor

            div = weight_divisor(p.weight, p.normalize)
            if name == "linear":
                common = common[:5] + (0, 0)  # a base given to linear is ignored, as in mergekit
            _native.weighted_delta_sum_raw(*common, p.weight, div, 1.0 if name == "linear" else p.lambda_, threads)
        elif name == "ties":
            _native.ties_raw(
                *common, p.weight, p.density, p.normalize, p.lambda_, p.election, p.selection == "topk", threads,
                p.rescale,
            )
        elif name in ("dare_linear", "dare_ties"):
            _native.dare_raw(
                *common, p.weight, p.density, consensus, p.normalize, p.lambda_, p.rescale, p.seed, p.key, threads
            )
        elif name in ("della", "della_linear"):
            shape = shape if shape is not None else getattr(out, "shape", None)
            if shape is None:
                raise ValueError(
                    f"tensor '{job.tensor}': {name} ranks |delta| per row: run_raw needs the tensor's shape (shape=)"
                )
            _native.della_raw(
                *common, p.weight, p.density, p.epsilon, consensus, p.normalize, p.lambda_, p.rescale, p.seed, p.key,
                tuple(shape), threads,
            )
        elif name in ("breadcrumbs", "breadcrumbs_ties"):
            _native.breadcrumbs_raw(
                *common, p.weight, p.density, p.gamma, consensus, p.normalize, p.lambda_, p.rescale,
                p.selection == "topk", threads,
            )
        elif name == "sce":
            if base is None:
                raise ValueError(f"tensor '{job.tensor}': sce needs a base model")
            _native.sce_raw(*common, p.select_topk, threads)
        elif name == "nearswap":
            if base is None:
                raise ValueError(f"tensor '{job.tensor}': nearswap needs a base model")
            _native.nearswap_raw(out.ptr, codes[out.dtype], n, inputs[0].ptr, codes[inputs[0].dtype], base.ptr,
                                 codes[base.dtype], p.t, threads)
        elif name == "passthrough":
            why = passthrough_reason(p.scale[0], inputs[0].dtype, out.dtype)
            if why is not None:  # guarded by raw_reasons
                raise ValueError(f"tensor '{job.tensor}': {why}")
            import ctypes

            from ..io.index import ITEMSIZE

            ctypes.memmove(out.ptr, inputs[0].ptr, n * ITEMSIZE[out.dtype])
        else:  # guarded by not_supported_reasons
            raise AssertionError(name)
