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
output dtype (round-to-nearest-even), bit-identical to the torch references in ``fastmerge.methods``
(the L1 rescale of the sparsifying methods excepted, whose two norms are summed more accurately than
torch's fp32 ``sum``: see ``csrc/include/fastmerge/gta.h``).

Importing this module does not import torch (the typed wrappers import it when called). For a torch-free
caller (the native fast path, which maps safetensors files itself) every kernel also has a ``*_raw``
entry point taking addresses (ints), element counts and dtype codes (``DTYPE_CODES``); they check what can
be checked without the buffers (list lengths, codes, parameter ranges) and trust the pointers:

* ``weighted_delta_sum_raw(out, out_dtype, n, inputs, input_dtypes, base, base_dtype, weights, divisor,
  lambda_, threads)``: linear (``base=0``), task_arithmetic;
* ``ties_raw(out, out_dtype, n, inputs, input_dtypes, base, base_dtype, weights, densities, normalize,
  lambda_, election, topk, threads, rescale)``;
* ``dare_raw(..., weights, densities, consensus, normalize, lambda_, rescale, seed, key, threads)``:
  dare_ties (``consensus="sum"``), dare_linear (None);
* ``della_raw(..., weights, densities, epsilons, consensus, normalize, lambda_, rescale, seed, key, shape,
  threads)``: della ("sum"), della_linear (None); ``shape`` is the tensor's shape, which defines the ranked
  rows (``della_rows``);
* ``breadcrumbs_raw(..., weights, densities, gammas, consensus, normalize, lambda_, rescale, topk,
  threads)``: breadcrumbs_ties ("sum"), breadcrumbs (None);
* ``sce_raw(out, out_dtype, n, inputs, input_dtypes, base, base_dtype, select_topk, threads)``: sce.

``fastmerge.backends.native.NativeBackend.run_raw`` maps a method's parameters onto these.
``key`` is the tensor name's hash (``fastmerge.methods.base.ParamContext(name).key``), ``seed`` the run's
seed (any int; taken modulo 2^64). Every raw entry point releases the GIL while the kernel runs.
"""

from __future__ import annotations

import importlib
import math
import os
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
    "DTYPE_CODES",
    "weighted_delta_sum",
    "ties",
    "dare",
    "della",
    "breadcrumbs",
    "ties_cuda",
    "kth_largest_abs_diff",
    "weighted_delta_sum_raw",
    "ties_raw",
    "dare_raw",
    "della_raw",
    "breadcrumbs_raw",
    "sce",
    "sce_raw",
    "della_rows",
    "nearswap",
    "nearswap_raw",
    "NEARSWAP_MIN_T",
]

#: the smallest NearSwap t the kernel covers (the clamp form; methods/nearswap.py DIFF_FLOOR)
NEARSWAP_MIN_T = 1e-6

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


#: GOMP_SPINCOUNT given to libgomp while ``_C`` loads it (None: the user's OMP settings were left alone).
#: libgomp's idle workers spin up to 300000 iterations (its default) before sleeping. In a merge they spin
#: while the master thread does the serial parts of a kernel or Python runs between tensors: 18% of all
#: CPU samples of a ties merge on the 2-core machine, taken from the writer and read-ahead threads.
#: With 2000, interleaved A/B of the benchmark family's ties merge (bench/RESULTS.md): in-process median
#: 0.725 -> 0.583 s and 0.827 -> 0.686 s (both orders of the pair). libgomp reads the variable once,
#: when it loads; it is removed again afterwards, so child processes do not inherit it. A libgomp already
#: loaded (by torch, imported first) is not affected. Set GOMP_SPINCOUNT or OMP_WAIT_POLICY to choose.
OMP_SPINCOUNT: str | None = (
    None if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ else "2000"
)
if OMP_SPINCOUNT is not None:
    os.environ["GOMP_SPINCOUNT"] = OMP_SPINCOUNT
try:
    _C = _load("_C", "not built (fastmerge was installed without its C++ extension)")
finally:
    if OMP_SPINCOUNT is not None:
        del os.environ["GOMP_SPINCOUNT"]
if _C is None:
    OMP_SPINCOUNT = None  # no libgomp of ours was loaded
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
        "omp_spincount": OMP_SPINCOUNT,
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
#: consensus codes of the generalized-task-arithmetic kernels: TIES's sign election, or None (weighted sum)
_CONSENSUS = {"sum": 0, "count": 1, None: 2}
#: dtype codes of the kernels, by torch name and by safetensors name
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "F32": 0, "F16": 1, "BF16": 2}


def _dtype_code(t: "torch.Tensor", name: str) -> int:
    import torch

    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    try:
        return codes[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}") from None


def _check_tensor(t: Any, name: str, numel: int | None, device: str = "cpu") -> int:
    """Checks one buffer argument (on ``device``: "cpu" or "cuda"); returns its dtype code."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != device:
        raise ValueError(f"{name}: must be a {device.upper()} tensor, got device '{t.device}'")
    code = _dtype_code(t, name)
    if not t.is_contiguous():
        raise ValueError(
            f"{name}: must be contiguous (call .contiguous()); shape {tuple(t.shape)} has strides {t.stride()}"
        )
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: has {t.numel()} elements, expected {numel} (the size of out)")
    return code


def _check_inputs(inputs: Sequence["torch.Tensor"], numel: int, device: str = "cpu") -> tuple[list[int], list[int]]:
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs: expected a sequence of tensors, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError("inputs: need at least one input tensor")
    codes = [_check_tensor(x, f"inputs[{i}]", numel, device) for i, x in enumerate(inputs)]
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
    rescale: bool = False,
) -> None:
    """Fused TIES-merging (trim, elect sign, disjoint merge) in fp32, one rounding into ``out``.

    Same maths as ``fastmerge.methods.ties``: each model keeps its ``k_i = max(1, int(density_i · numel))``
    largest ``|x_i − base|`` (density >= 1 keeps all); ``exact_k=False`` keeps every value equal to the k-th
    largest, ``exact_k=True`` keeps exactly k, breaking ties at the threshold by index order
    (``selection: topk``). ``election``: "sum" or "count". ``rescale``: L1-rescale each trimmed delta
    (one more read of the inputs). The thresholds of all models are found together in one read of the
    inputs (a sampled bracket, then a selection among ~3% of the elements; no sort), exact.
    """
    ext = _cpu_ext()
    out_code = _check_tensor(out, "out", None)
    n = out.numel()
    ptrs, codes = _check_inputs(inputs, n)
    if base is None:
        raise ValueError("base: TIES needs a base model tensor, got None")
    base_code = _check_tensor(base, "base", n)
    w = _check_floats(weights, "weights", len(inputs))
    d = _check_densities(densities, len(inputs))
    if election not in _ELECTIONS:
        raise ValueError(f"election: must be 'sum' or 'count', got {election!r}")
    ext.ties(
        out.data_ptr(), out_code, n, ptrs, codes, base.data_ptr(), base_code, w, d, bool(normalize), float(lam),
        _ELECTIONS[election], bool(exact_k), _check_threads(threads), bool(rescale),
    )


def _consensus_code(consensus: str | None) -> int:
    try:
        return _CONSENSUS[consensus]
    except (KeyError, TypeError):
        raise ValueError(f"consensus: must be 'sum', 'count' or None, got {consensus!r}") from None


def _check_densities(densities: Sequence[float], count: int) -> list[float]:
    d = _check_floats(densities, "densities", count)
    for i, di in enumerate(d):
        if not di > 0.0:  # also catches NaN
            raise ValueError(f"densities[{i}]: density must be in (0, 1], got {di}")
    return d


def _gta_common(out: Any, inputs: Any, base: Any, weights: Any) -> tuple[Any, int, int, list[int], list[int], int, list[float]]:
    ext = _cpu_ext()
    out_code = _check_tensor(out, "out", None)
    n = out.numel()
    ptrs, codes = _check_inputs(inputs, n)
    if base is None:
        raise ValueError("base: this method needs a base model tensor, got None")
    base_code = _check_tensor(base, "base", n)
    w = _check_floats(weights, "weights", len(inputs))
    return ext, out_code, n, ptrs, codes, base_code, w


def _seed64(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    return seed & ((1 << 64) - 1)  # as methods/rng.py: the seed modulo 2^64


def _key63(key: int) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 1 << 64:
        raise ValueError(f"key: expected an int in [0, 2^64) (the tensor name's hash), got {key!r}")
    return key


def dare(
    out: "torch.Tensor",
    inputs: Sequence["torch.Tensor"],
    base: "torch.Tensor",
    weights: Sequence[float],
    densities: Sequence[float],
    consensus: str | None,
    normalize: bool,
    lam: float,
    rescale: bool,
    seed: int,
    key: int,
    threads: int = 0,
) -> None:
    """Fused DARE (``dare_ties``: ``consensus="sum"``; ``dare_linear``: ``None``) into ``out``.

    Same maths and the same random mask as ``fastmerge.methods.dare`` for one ``seed`` and ``key`` (the
    tensor name's hash): element j of model i is kept iff ``u(seed, key, i, j) < fp32(density_i)``
    (``fastmerge.methods.rng``); density >= 1 keeps the delta whole. ``rescale``: mergekit's L1 rule.
    """
    ext, out_code, n, ptrs, codes, base_code, w = _gta_common(out, inputs, base, weights)
    d = _check_densities(densities, len(inputs))
    ext.dare(
        out.data_ptr(), out_code, n, ptrs, codes, base.data_ptr(), base_code, w, d, _consensus_code(consensus),
        bool(normalize), float(lam), bool(rescale), _seed64(seed), _key63(key), _check_threads(threads),
    )


def _check_select_topk(select_topk: float) -> float:
    v = float(select_topk)
    if not 0.0 < v <= 1.0:  # also catches NaN
        raise ValueError(f"select_topk: must be in (0, 1], got {select_topk}")
    return v


def sce(
    out: "torch.Tensor",
    inputs: Sequence["torch.Tensor"],
    base: "torch.Tensor",
    select_topk: float = 1.0,
    threads: int = 0,
) -> None:
    """Fused SCE (default mode) into ``out``: ``fastmerge.methods.sce``'s variance selection
    (``select_topk`` < 1), matrix-level weights and sign-elected disjoint mean, fp32 math, one rounding.

    The weights' mean squares are summed in double and rounded once (see ``csrc/include/fastmerge/sce.h``)."""
    ext, out_code, n, ptrs, codes, base_code, _ = _gta_common(out, inputs, base, [1.0] * len(inputs))
    ext.sce(
        out.data_ptr(), out_code, n, ptrs, codes, base.data_ptr(), base_code, _check_select_topk(select_topk),
        _check_threads(threads),
    )


def _check_nearswap_t(t: float) -> float:
    t = float(t)
    if not t >= NEARSWAP_MIN_T:  # (NaN too)
        raise ValueError(f"t: the kernel covers t >= {NEARSWAP_MIN_T} (the clamp form), got {t}")
    return t


def nearswap(out: "torch.Tensor", x: "torch.Tensor", base: "torch.Tensor", t: float, threads: int = 0) -> None:
    """NearSwap in default mode into ``out``: ``min(max(base − t, x), base + t)`` in fp32 (NaN propagates
    as in torch.maximum/minimum), one rounding; ``t`` >= 1e-6 (smaller t: the reference's weighted form)."""
    ext = _cpu_ext()
    out_code = _check_tensor(out, "out", None)
    n = out.numel()
    x_code = _check_tensor(x, "x", n)
    base_code = _check_tensor(base, "base", n)
    ext.nearswap(out.data_ptr(), out_code, n, x.data_ptr(), x_code, base.data_ptr(), base_code, _check_nearswap_t(t),
                 _check_threads(threads))


def della_rows(shape: Sequence[int]) -> tuple[int, int, int]:
    """(outer, row_len, inner) of DELLA's rows for a tensor of ``shape`` (``methods.della.to_rows``): 0-D and
    1-D: one row; 2-D: each row; N-D: the fibres along dim 1 (``outer·inner`` rows of ``shape[1]``
    elements, element c of row (o, q) at flat index ``o·row_len·inner + c·inner + q``)."""
    dims = [int(s) for s in shape]
    if len(dims) < 2:
        return 1, max(1, math.prod(dims)), 1
    return dims[0], dims[1], math.prod(dims[2:])


def della(
    out: "torch.Tensor",
    inputs: Sequence["torch.Tensor"],
    base: "torch.Tensor",
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    consensus: str | None,
    normalize: bool,
    lam: float,
    rescale: bool,
    seed: int,
    key: int,
    threads: int = 0,
) -> None:
    """Fused DELLA (``della``: ``consensus="sum"``; ``della_linear``: ``None``) into ``out``.

    Same maths and the same mask as ``fastmerge.methods.della`` (default mode): per row of ``out``'s shape
    (``della_rows``), ascending |δ| ranks (16-bit keys when model and base share a 16-bit dtype) give keep
    probabilities ``(density − ε) + 2ε·rank/(n − 1)``, compared with the counter-based uniforms of
    ``fastmerge.methods.rng``. Ranks come from a stable radix sort per row, not a comparison sort.
    """
    ext, out_code, n, ptrs, codes, base_code, w = _gta_common(out, inputs, base, weights)
    d = _check_densities(densities, len(inputs))
    e = _check_floats(epsilons, "epsilons", len(inputs))
    outer, row_len, inner = della_rows(out.shape)
    ext.della(
        out.data_ptr(), out_code, n, ptrs, codes, base.data_ptr(), base_code, w, d, e, _consensus_code(consensus),
        bool(normalize), float(lam), bool(rescale), _seed64(seed), _key63(key), outer, row_len, inner,
        _check_threads(threads),
    )


def breadcrumbs(
    out: "torch.Tensor",
    inputs: Sequence["torch.Tensor"],
    base: "torch.Tensor",
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    consensus: str | None,
    normalize: bool,
    lam: float,
    rescale: bool,
    topk: bool,
    threads: int = 0,
) -> None:
    """Fused Model Breadcrumbs (``breadcrumbs_ties``: ``consensus="sum"``; ``breadcrumbs``: ``None``).

    Same maths as ``fastmerge.methods.breadcrumbs``: each model keeps the band of ascending |δ| ranks
    ``[n_bot, n_bot + target)``; ``topk=False`` keeps every |δ| tied at a band boundary, ``topk=True``
    exactly ``target`` entries (ties by index order). The two boundaries of every model are found in one
    read of the inputs (no sort).
    """
    ext, out_code, n, ptrs, codes, base_code, w = _gta_common(out, inputs, base, weights)
    d = _check_densities(densities, len(inputs))
    g = _check_floats(gammas, "gammas", len(inputs))
    for i, gi in enumerate(g):
        if not 0.0 <= gi <= 1.0:
            raise ValueError(f"gammas[{i}]: gamma must be in [0, 1], got {gi}")
    ext.breadcrumbs(
        out.data_ptr(), out_code, n, ptrs, codes, base.data_ptr(), base_code, w, d, g, _consensus_code(consensus),
        bool(normalize), float(lam), bool(rescale), bool(topk), _check_threads(threads),
    )


def ties_cuda(
    out: "torch.Tensor",
    inputs: Sequence["torch.Tensor"],
    base: "torch.Tensor",
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool,
    lam: float = 1.0,
    election: str = "sum",
    exact_k: bool = False,
    rescale: bool = False,
) -> None:
    """``ties`` on CUDA tensors (``fastmerge._C_cuda``): the same per-element formulas, so the same bits as
    the CPU kernel for the same thresholds; radix-select thresholds (three histogram passes). Runs on torch's
    current stream and returns when the result is written (the selection reads histograms back)."""
    import torch

    ok, why = cuda_usable()
    if not ok:
        raise RuntimeError(f"fastmerge._C_cuda is not usable: {why}")
    out_code = _check_tensor(out, "out", None, "cuda")
    n = out.numel()
    ptrs, in_codes = _check_inputs(inputs, n, "cuda")
    base_code = _check_tensor(base, "base", n, "cuda")
    w = _check_floats(weights, "weights", len(inputs))
    d = _check_densities(densities, len(inputs))
    if election not in _ELECTIONS:
        raise ValueError(f"election: must be 'sum' or 'count', got {election!r}")
    _C_cuda.ties(
        out.data_ptr(), out_code, n, ptrs, in_codes, base.data_ptr(), base_code, w, d,
        bool(normalize), float(lam), _ELECTIONS[election], bool(exact_k), torch.cuda.current_stream().cuda_stream,
        bool(rescale),
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


# ---------------------------------------------------------------------------------------------------------
# Raw entry points (no torch): addresses as ints, dtype codes (DTYPE_CODES). See the module docstring.


def weighted_delta_sum_raw(
    out: int, out_dtype: int, n: int, inputs: Sequence[int], input_dtypes: Sequence[int], base: int, base_dtype: int,
    weights: Sequence[float], divisor: float | None, lambda_: float = 1.0, threads: int = 0,
) -> None:
    """linear (``base=0``) / task_arithmetic on raw buffers: ``divisor`` is the fp32 sum of the weights
    (``methods.linear.weight_divisor``, torch-free) or None. See ``weighted_delta_sum``."""
    div = 0.0 if divisor is None else float(divisor)
    if divisor is not None and div == 0.0:
        raise ValueError("divisor: 0 would divide by zero (pass None for no division)")
    _cpu_ext().weighted_delta_sum(
        out, out_dtype, n, list(inputs), list(input_dtypes), base, base_dtype, [float(w) for w in weights], div,
        float(lambda_), threads,
    )


def ties_raw(
    out: int, out_dtype: int, n: int, inputs: Sequence[int], input_dtypes: Sequence[int], base: int, base_dtype: int,
    weights: Sequence[float], densities: Sequence[float], normalize: bool, lambda_: float, election: str,
    topk: bool, threads: int = 0, rescale: bool = False,
) -> None:
    """TIES on raw buffers (``election``: "sum" | "count"; ``topk``: selection topk). See ``ties``."""
    if election not in _ELECTIONS:
        raise ValueError(f"election: must be 'sum' or 'count', got {election!r}")
    _cpu_ext().ties(
        out, out_dtype, n, list(inputs), list(input_dtypes), base, base_dtype, [float(w) for w in weights],
        [float(d) for d in densities], bool(normalize), float(lambda_), _ELECTIONS[election], bool(topk), threads,
        bool(rescale),
    )


def dare_raw(
    out: int, out_dtype: int, n: int, inputs: Sequence[int], input_dtypes: Sequence[int], base: int, base_dtype: int,
    weights: Sequence[float], densities: Sequence[float], consensus: str | None, normalize: bool, lambda_: float,
    rescale: bool, seed: int, key: int, threads: int = 0,
) -> None:
    """DARE on raw buffers (``consensus``: "sum" for dare_ties, None for dare_linear). See ``dare``."""
    _cpu_ext().dare(
        out, out_dtype, n, list(inputs), list(input_dtypes), base, base_dtype, [float(w) for w in weights],
        [float(d) for d in densities], _consensus_code(consensus), bool(normalize), float(lambda_), bool(rescale),
        _seed64(seed), _key63(key), threads,
    )


def della_raw(
    out: int, out_dtype: int, n: int, inputs: Sequence[int], input_dtypes: Sequence[int], base: int, base_dtype: int,
    weights: Sequence[float], densities: Sequence[float], epsilons: Sequence[float], consensus: str | None,
    normalize: bool, lambda_: float, rescale: bool, seed: int, key: int, shape: Sequence[int], threads: int = 0,
) -> None:
    """DELLA on raw buffers (``consensus``: "sum" for della, None for della_linear); ``shape``: the tensor's
    shape, which defines the ranked rows (``della_rows``). See ``della``."""
    outer, row_len, inner = della_rows(shape)
    _cpu_ext().della(
        out, out_dtype, n, list(inputs), list(input_dtypes), base, base_dtype, [float(w) for w in weights],
        [float(d) for d in densities], [float(e) for e in epsilons], _consensus_code(consensus), bool(normalize),
        float(lambda_), bool(rescale), _seed64(seed), _key63(key), outer, row_len, inner, threads,
    )


def breadcrumbs_raw(
    out: int, out_dtype: int, n: int, inputs: Sequence[int], input_dtypes: Sequence[int], base: int, base_dtype: int,
    weights: Sequence[float], densities: Sequence[float], gammas: Sequence[float], consensus: str | None,
    normalize: bool, lambda_: float, rescale: bool, topk: bool, threads: int = 0,
) -> None:
    """Model Breadcrumbs on raw buffers (``consensus``: "sum" for breadcrumbs_ties, None for breadcrumbs).
    See ``breadcrumbs``."""
    _cpu_ext().breadcrumbs(
        out, out_dtype, n, list(inputs), list(input_dtypes), base, base_dtype, [float(w) for w in weights],
        [float(d) for d in densities], [float(g) for g in gammas], _consensus_code(consensus), bool(normalize),
        float(lambda_), bool(rescale), bool(topk), threads,
    )


def sce_raw(
    out: int, out_dtype: int, n: int, inputs: Sequence[int], input_dtypes: Sequence[int], base: int, base_dtype: int,
    select_topk: float, threads: int = 0,
) -> None:
    """SCE (default mode) on raw buffers. See ``sce``."""
    _cpu_ext().sce(
        out, out_dtype, n, list(inputs), list(input_dtypes), base, base_dtype, _check_select_topk(select_topk), threads
    )


def nearswap_raw(out: int, out_dtype: int, n: int, x: int, x_dtype: int, base: int, base_dtype: int, t: float,
                 threads: int = 0) -> None:
    """NearSwap on raw buffers (the torch-free fast path). See ``nearswap``."""
    _cpu_ext().nearswap(out, out_dtype, n, x, x_dtype, base, base_dtype, _check_nearswap_t(t), threads)
