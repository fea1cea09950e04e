"""The one place that loads fastmerge's compiled extensions, and typed wrappers around them.

``fastmerge._C`` (C++ CPU kernels, always built) and ``fastmerge._C_cuda`` (CUDA kernels, built when nvcc
was found) are imported here and nowhere else. Import never raises: what loaded is recorded in

* ``HAS_CPU_EXT`` / ``HAS_CUDA_EXT``: the module imported;
* ``LOAD_ERRORS``: module name -> one-line reason it did not (shown by ``fastmerge env``);
* ``BUILD_INFO``: how the loaded modules were built, flattened as ``"<module>.<key>"``.

``HAS_CUDA_EXT`` only says the module imported: it links the CUDA runtime statically, so it imports on a
machine without a GPU or driver. ``cuda_usable()`` asks the driver.

The extensions take raw pointers (``tensor.data_ptr()``) and cannot check the tensors behind them, so
every call goes through the wrappers below, which check device, contiguity, size and dtype and raise
``TypeError`` / ``ValueError`` naming the argument. The kernels compute in fp32 and round once to the
output dtype (round-to-nearest-even), bit-identical to the torch references in ``fastmerge.methods``.
"""

from __future__ import annotations

import importlib
import traceback
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

__all__ = [
    "HAS_CPU_EXT",
    "HAS_CUDA_EXT",
    "LOAD_ERRORS",
    "BUILD_INFO",
    "cuda_usable",
    "report",
    "weighted_delta_sum",
    "ties",
    "kth_largest_abs_diff",
]

LOAD_ERRORS: dict[str, str] = {}
#: full tracebacks of the failed imports, for debugging (``report(verbose=True)``)
LOAD_TRACEBACKS: dict[str, str] = {}
BUILD_INFO: dict[str, Any] = {}


def _load(name: str, not_built: str) -> Any:
    try:
        mod = importlib.import_module(f"fastmerge.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"fastmerge.{name}":  # the file is absent: a build without it, not a broken one
            LOAD_ERRORS[name] = not_built
        else:
            LOAD_ERRORS[name] = f"{type(e).__name__}: {e}".splitlines()[0]
            LOAD_TRACEBACKS[name] = traceback.format_exc()
        return None
    except Exception as e:  # ImportError (undefined symbol, wrong ABI), OSError, ...: never raise at import
        first = str(e).splitlines()[0] if str(e) else ""
        LOAD_ERRORS[name] = f"{type(e).__name__}: {first}"
        LOAD_TRACEBACKS[name] = traceback.format_exc()
        return None
    try:
        BUILD_INFO.update({f"{name}.{k}": v for k, v in dict(mod.build_info()).items() if k != "module"})
    except Exception as e:
        LOAD_ERRORS[f"{name}.build_info"] = f"{type(e).__name__}: {e}"
    return mod


_C = _load("_C", "not built (fastmerge was installed without its C++ extension)")
_C_cuda = _load("_C_cuda", "not built (no CUDA compiler at build time, or FASTMERGE_CUDA=OFF)")
HAS_CPU_EXT: bool = _C is not None
HAS_CUDA_EXT: bool = _C_cuda is not None

_cuda_status: tuple[bool, str] | None = None


def cuda_usable() -> tuple[bool, str]:
    """(True, description) if the CUDA extension loaded and a driver and device can run it; else (False, why).

    The driver is asked once per process (the CUDA runtime caches its initialisation anyway)."""
    global _cuda_status
    if _cuda_status is None:
        if _C_cuda is None:
            _cuda_status = (False, f"fastmerge._C_cuda not loaded: {LOAD_ERRORS.get('_C_cuda', 'unknown')}")
        else:
            try:
                ok, why = _C_cuda.is_available()
                _cuda_status = (bool(ok), str(why))
            except Exception as e:
                _cuda_status = (False, f"fastmerge._C_cuda.is_available() failed: {type(e).__name__}: {e}")
    return _cuda_status


def report(verbose: bool = False) -> dict[str, Any]:
    """What was built, what loaded and what is usable (for ``fastmerge env``)."""
    ok, why = cuda_usable()
    r: dict[str, Any] = {
        "has_cpu_ext": HAS_CPU_EXT,
        "has_cuda_ext": HAS_CUDA_EXT,
        "cuda_usable": ok,
        "cuda_reason": why,
        "load_errors": dict(LOAD_ERRORS),
        "build_info": dict(BUILD_INFO),
    }
    if HAS_CUDA_EXT and _C_cuda is not None:
        try:
            r["cuda_device_count"] = int(_C_cuda.device_count())
        except Exception as e:
            r["cuda_device_count"] = f"error: {e}"
    if verbose:
        r["load_tracebacks"] = dict(LOAD_TRACEBACKS)
    return r


# ---------------------------------------------------------------------------------------------------------
# Typed wrappers (CPU)

_ELECTIONS = {"sum": 0, "count": 1}


def _dtype_code(t: "torch.Tensor", name: str) -> int:
    import torch

    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    try:
        return codes[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}") from None


def _check_tensor(t: Any, name: str, numel: int | None) -> int:
    """Checks one buffer argument; returns its dtype code."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: must be a CPU tensor, got device '{t.device}'")
    code = _dtype_code(t, name)
    if not t.is_contiguous():
        raise ValueError(
            f"{name}: must be contiguous (call .contiguous()); shape {tuple(t.shape)} has strides {t.stride()}"
        )
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: has {t.numel()} elements, expected {numel} (the size of out)")
    return code


def _check_inputs(inputs: Sequence["torch.Tensor"], numel: int) -> tuple[list[int], list[int]]:
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs: expected a sequence of tensors, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError("inputs: need at least one input tensor")
    codes = [_check_tensor(x, f"inputs[{i}]", numel) for i, x in enumerate(inputs)]
    return [x.data_ptr() for x in inputs], codes


def _check_floats(values: Sequence[float], name: str, count: int) -> list[float]:
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of numbers, got {values!r}") from None
    if len(vals) != count:
        raise ValueError(f"{name}: got {len(vals)} values for {count} inputs")
    return vals


def _check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads: must be an int >= 0 (0 = OpenMP default), got {threads!r}")
    return threads


def _cpu_ext() -> Any:
    if _C is None:
        raise RuntimeError(f"fastmerge._C is not available: {LOAD_ERRORS.get('_C', 'not loaded')}")
    return _C


def weighted_delta_sum(
    out: "torch.Tensor",
    inputs: Sequence["torch.Tensor"],
    base: "torch.Tensor | None",
    weights: Sequence[float],
    divisor: float | None,
    lam: float = 1.0,
    threads: int = 0,
) -> None:
    """``out = [base +] lam · Σ_i w_i·(x_i [− base]) [/ divisor]`` in fp32, one rounding into ``out``.

    Serves ``linear`` (``base=None``; ``divisor`` = the fp32 sum of the weights, or None) and
    ``task_arithmetic``. Per element the op order is exactly the references': ``acc = 0``;
    ``acc = acc + w_i * (x_i - b)`` in model order; ``/ divisor``; ``* lam`` (if lam != 1); ``b + acc``.
    All tensors: CPU, contiguous, same number of elements, float32/float16/bfloat16 (may differ).
    ``threads``: 0 = OpenMP default; the result does not depend on it. Releases the GIL.
    """
    ext = _cpu_ext()
    n = None
    out_code = _check_tensor(out, "out", n)
    n = out.numel()
    ptrs, codes = _check_inputs(inputs, n)
    base_ptr, base_code = 0, 0
    if base is not None:
        base_code = _check_tensor(base, "base", n)
        base_ptr = base.data_ptr()
    w = _check_floats(weights, "weights", len(inputs))
    if divisor is None:
        div = 0.0
    else:
        div = float(divisor)
        if div == 0.0:
            raise ValueError("divisor: 0 would divide by zero (pass None for no division)")
    ext.weighted_delta_sum(
        out.data_ptr(), out_code, n, ptrs, codes, base_ptr, base_code, w, div, float(lam), _check_threads(threads)
    )


def ties(
    out: "torch.Tensor",
    inputs: Sequence["torch.Tensor"],
    base: "torch.Tensor",
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool,
    lam: float = 1.0,
    election: str = "sum",
    exact_k: bool = False,
    threads: int = 0,
) -> None:
    """Fused TIES-merging (trim, elect sign, disjoint merge) in fp32, one rounding into ``out``.

    Same maths as ``fastmerge.methods.ties`` (``rescale`` excepted): each model keeps its
    ``k_i = max(1, int(density_i · numel))`` largest ``|x_i − base|`` (density >= 1 keeps all);
    ``exact_k=False`` keeps every value equal to the k-th largest, ``exact_k=True`` keeps exactly k,
    breaking ties at the threshold by index order (``selection: topk``). ``election``: "sum" or "count".
    Thresholds are found by a radix select, not a sort (two reads of each trimmed input).
    """
    ext = _cpu_ext()
    out_code = _check_tensor(out, "out", None)
    n = out.numel()
    ptrs, codes = _check_inputs(inputs, n)
    if base is None:
        raise ValueError("base: TIES needs a base model tensor, got None")
    base_code = _check_tensor(base, "base", n)
    w = _check_floats(weights, "weights", len(inputs))
    d = _check_floats(densities, "densities", len(inputs))
    for i, di in enumerate(d):
        if not di > 0.0:  # also catches NaN
            raise ValueError(f"densities[{i}]: density must be in (0, 1], got {di}")
    if election not in _ELECTIONS:
        raise ValueError(f"election: must be 'sum' or 'count', got {election!r}")
    ext.ties(
        out.data_ptr(), out_code, n, ptrs, codes, base.data_ptr(), base_code, w, d, bool(normalize), float(lam),
        _ELECTIONS[election], bool(exact_k), _check_threads(threads),
    )


def kth_largest_abs_diff(x: "torch.Tensor", base: "torch.Tensor | None", k: int, threads: int = 0) -> float:
    """The k-th largest ``|x − base|`` (``|x|`` if ``base`` is None) in fp32, 1 <= k <= numel.

    Equals ``torch.kthvalue((x.float() - base.float()).abs().flatten(), numel - k + 1).values`` (NaN ranks
    largest), found by a two-pass radix select on the fp32 bit patterns."""
    ext = _cpu_ext()
    x_code = _check_tensor(x, "x", None)
    n = x.numel()
    base_ptr, base_code = 0, 0
    if base is not None:
        base_code = _check_tensor(base, "base", n)
        base_ptr = base.data_ptr()
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if n == 0:
        raise ValueError("x: empty tensor has no k-th largest value")
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, {n}] (the number of elements), got {k}")
    return float(ext.kth_largest_abs_diff(x.data_ptr(), x_code, base_ptr, base_code, n, k, _check_threads(threads)))
