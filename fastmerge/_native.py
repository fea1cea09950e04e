"""The one place that loads fastmerge's compiled extensions, and typed wrappers around them.

``fastmerge._C`` (C++ CPU kernels, always built) and ``fastmerge._C_cuda`` (CUDA kernels, built when nvcc
was found) are imported here and nowhere else. Import never raises: what loaded is recorded in

* ``HAS_CPU_EXT`` / ``HAS_CUDA_EXT``: the module imported;
* ``LOAD_ERRORS``: module name -> one-line reason it did not (shown by ``fastmerge env``);
* ``BUILD_INFO``: how the loaded modules were built, flattened as ``"<module>.<key>"``.

``HAS_CUDA_EXT`` only says the module imported: it links the CUDA runtime statically, so it imports on a
machine without a GPU or driver. ``cuda_usable()`` asks the driver.

The extensions take raw pointers and cannot check the buffers behind them, so every call goes through
the wrappers below: one per kernel, each taking torch tensors (``tensor.data_ptr()``) *or* raw views
(``fastmerge.io.reader.RawView``: ``ptr``, ``dtype`` name, ``numel``; the torch-free engine's mapped
files), with its argument list written once. Where a kernel takes an input or a base it also takes an
``Fp8Source`` (FP8 bytes and their scales, dequantised by the kernels' load step, csrc/cpu/fp8.h). They
check device, contiguity, size and dtype (for a raw view: dtype and size; its address is trusted) and
raise ``TypeError`` / ``ValueError`` naming the argument. The kernels compute in fp32 and round once to the
output dtype (round-to-nearest-even), bit-identical to the torch references in ``fastmerge.methods`` (the L1 rescale of the sparsifying
methods excepted, whose two norms are summed more accurately than torch's fp32 ``sum``: see
``csrc/include/fastmerge/gta.h``). Every kernel releases the GIL while it runs.

Importing this module does not import torch, nor does a call on raw views. Which method runs on which
kernel, with which arguments, is declared by the method (``MergeMethod.native``, ``methods/<m>.py``).
``key`` is the tensor name's hash (``fastmerge.methods.base.ParamContext(name).key``), ``seed`` the run's
seed (any int; taken modulo 2^64).
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import traceback
from typing import Any, Sequence

__all__ = [
    "HAS_CPU_EXT", "HAS_CUDA_EXT", "LOAD_ERRORS", "BUILD_INFO", "cuda_usable", "report", "DTYPE_CODES", "is_raw",
    "weighted_delta_sum", "ties", "ties_segments", "dare", "della", "della_rows", "breadcrumbs", "sce", "nearswap", "copy",
    "kth_largest_abs_diff", "NEARSWAP_MIN_T", "Fp8Source", "peft_prune_rules", "peft_merge", "PEFT_MODES",
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
#: loaded (by torch, imported first) is not affected: _C then shares it, with its spin count (None here; a
#: moe-16k linear merge ran 0.62-0.73 s so, 0.52-0.62 s with GOMP_SPINCOUNT=2000 set before Python started).
#: Set GOMP_SPINCOUNT or OMP_WAIT_POLICY to choose.
OMP_SPINCOUNT: str | None = (
    None if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ else "2000"
)


def _libgomp_loaded() -> bool:
    """Whether a libgomp is mapped into this process already (Linux; elsewhere: no way to tell, False)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


#: a libgomp already loaded: it read its settings when it loaded; ours would not reach it
LIBGOMP_PRELOADED = OMP_SPINCOUNT is not None and _libgomp_loaded()
if LIBGOMP_PRELOADED:
    OMP_SPINCOUNT = None
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
            if not _cuda_status[0] and not _nvidia_driver_present():
                # the runtime says "CUDA driver version is insufficient" where there is no driver at all
                _cuda_status = (False, f"no CUDA device (no NVIDIA driver on this machine; the CUDA runtime says: "
                                       f"{_cuda_status[1]})")
    return _cuda_status


def _nvidia_driver_present() -> bool:
    """An NVIDIA driver is loaded (Linux: its /proc entry or a device node; WSL: /dev/dxg)."""
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))


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
        "libgomp_preloaded": LIBGOMP_PRELOADED,
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
# The wrappers: one per kernel, on torch tensors or raw views, arguments checked here once

_ELECTIONS = {"sum": 0, "count": 1}
#: consensus codes of the generalized-task-arithmetic kernels: TIES's sign election, or None (weighted sum)
_CONSENSUS = {"sum": 0, "count": 1, None: 2}
#: dtype codes of the kernels, by torch name and by safetensors name
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "F32": 0, "F16": 1, "BF16": 2}
_ITEMSIZE = (4, 2, 2)  # by dtype code


#: the kernels' code of an FP8 input (csrc/include/fastmerge/common.h FP8): its pointer is an ``Fp8Source``'s descriptor
FP8_CODE = 3


class _Fp8Desc(ctypes.Structure):
    """csrc/cpu/fp8.h ``Fp8Src``, field for field (56 bytes)."""

    _fields_ = [("magic", ctypes.c_uint64), ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("cols", ctypes.c_int64), ("scale_cols", ctypes.c_int64), ("bm", ctypes.c_int32), ("bn", ctypes.c_int32),
                ("kind", ctypes.c_int32), ("format", ctypes.c_int32)]


class Fp8Source:
    """An FP8 input of the CPU kernels, passed wherever they take an input or a base: the weight's FP8 bytes
    (``float8_e4m3fn`` / ``float8_e5m2``, ``numel`` of them at ``data_ptr``) and its fp32 scales (``scale_ptr``,
    ``scale_numel`` of them): ``kind`` "block" (one per ``block`` of a 2-D ``shape``, the last block of each
    dimension partial), "channel" (one per row, ``shape[0]`` rows), "tensor" (one) or "none" (scale 1). The
    kernels' load step (csrc/cpu/fp8.h) dequantises it in their passes, bit-identical to ``io.fp8.dequantize``.

    Addresses are trusted (as a raw view's); counts and shapes are checked here. ``keep``: objects that own the
    memory, held as long as this source."""

    dtype = "fp8_source"
    _FORMATS = {"float8_e4m3fn": 0, "float8_e5m2": 1}
    _KINDS = {"none": 0, "tensor": 1, "channel": 2, "block": 3}

    def __init__(self, data_ptr: int, numel: int, fmt: str, shape: Sequence[int], kind: str = "none", scale_ptr: int = 0,
                 scale_numel: int = 0, block: Sequence[int] | None = None, keep: Any = ()):
        if fmt not in self._FORMATS:
            raise TypeError(f"FP8 source: format must be float8_e4m3fn or float8_e5m2, got {fmt!r}")
        if kind not in self._KINDS:
            raise ValueError(f"FP8 source: scale kind must be one of {list(self._KINDS)}, got {kind!r}")
        dims = [int(d) for d in shape]
        if math.prod(dims) != numel:
            raise ValueError(f"FP8 source: shape {dims} has {math.prod(dims)} elements, the data {numel}")
        rows = dims[0] if dims else 1
        cols = max(1, numel // rows) if rows else 1
        bm = bn = scols = 0
        want = {"none": 0, "tensor": 1, "channel": rows}.get(kind)
        if kind == "block":
            if len(dims) != 2 or block is None or len(block) != 2 or min(block) < 1:
                raise ValueError(f"FP8 source: block scales need a matrix and a block of two sizes, got shape {dims}, block {block}")
            bm, bn = int(block[0]), int(block[1])
            scols = -(-cols // bn)
            want = -(-rows // bm) * scols
        if scale_numel != want:
            raise ValueError(f"FP8 source: {kind} scales of shape {dims} need {want} values, got {scale_numel}")
        if numel and (not data_ptr or (want and not scale_ptr)):
            raise ValueError("FP8 source: null data or scale pointer")
        self.numel, self.format, self.kind, self.shape = int(numel), fmt, kind, tuple(dims)
        self._keep = keep
        self._desc = _Fp8Desc(0x0031435253385046, data_ptr, scale_ptr or None, cols, scols, bm, bn, self._KINDS[kind],
                              self._FORMATS[fmt])
        self.ptr = ctypes.addressof(self._desc)


def is_raw(x: Any) -> bool:
    """Whether ``x`` is a raw view (``ptr``, ``dtype`` name, ``numel``) rather than a torch tensor."""
    return not hasattr(x, "data_ptr") and hasattr(x, "ptr")


def _buffer(x: Any, name: str, numel: int | None, device: str = "cpu", fp8: bool = False) -> tuple[int, int, int]:
    """(address, dtype code, element count) of one buffer argument, checked: a torch tensor on ``device``
    ("cpu" | "cuda"), contiguous, float32/float16/bfloat16, of ``numel`` elements; or a raw view (host
    memory; its address is trusted: the caller mapped it) of a known dtype and ``numel`` elements; or, where
    ``fp8`` (an input or a base of a CPU kernel), an ``Fp8Source``."""
    if isinstance(x, Fp8Source):
        if not fp8 or device != "cpu":
            raise TypeError(f"{name}: an FP8 source is read by the CPU kernels as an input or a base only")
        ptr, code, n = x.ptr, FP8_CODE, x.numel
    elif hasattr(x, "data_ptr"):  # a torch tensor: torch is loaded (the caller made it)
        import torch

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.device.type != device:
            raise ValueError(f"{name}: must be a {device.upper()} tensor, got device '{x.device}'")
        code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}.get(x.dtype)
        if code is None:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(
                f"{name}: must be contiguous (call .contiguous()); shape {tuple(x.shape)} has strides {x.stride()}"
            )
        ptr, n = x.data_ptr(), x.numel()
    elif all(hasattr(x, a) for a in ("ptr", "dtype", "numel")):  # a raw view (io.reader.RawView)
        if device != "cpu":
            raise ValueError(f"{name}: a raw view is host memory; the {device} kernel takes torch tensors")
        code = DTYPE_CODES.get(x.dtype)
        if code is None:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {x.dtype!r}")
        ptr, n = int(x.ptr), int(x.numel)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__} (or a raw view: ptr, dtype, numel)")
    if numel is not None and n != numel:
        raise ValueError(f"{name}: has {n} elements, expected {numel} (the size of out)")
    return ptr, code, n


def _buffers(out: Any, inputs: Any, base: Any, needs_base: str | None, device: str = "cpu") -> tuple:
    """The leading arguments of every merge kernel, checked: ``(out, out_dtype, n, inputs, input_dtypes,
    base, base_dtype)`` (base 0 when None). ``needs_base``: the method's name in the error when base is None."""
    out_ptr, out_code, n = _buffer(out, "out", None, device)
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs: expected a sequence of tensors, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError("inputs: need at least one input tensor")
    ins = [_buffer(x, f"inputs[{i}]", n, device, fp8=True) for i, x in enumerate(inputs)]
    if base is None:
        if needs_base is not None:
            raise ValueError(f"base: {needs_base} needs a base model tensor, got None")
        base_ptr, base_code = 0, 0
    else:
        base_ptr, base_code, _ = _buffer(base, "base", n, device, fp8=True)
    return out_ptr, out_code, n, [p for p, _, _ in ins], [c for _, c, _ in ins], base_ptr, base_code


def _device(out: Any) -> str:
    dev = getattr(out, "device", None)
    return "cuda" if getattr(dev, "type", None) == "cuda" else "cpu"


def _check_floats(values: Sequence[float], name: str, count: int) -> list[float]:
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of numbers, got {values!r}") from None
    if len(vals) != count:
        raise ValueError(f"{name}: got {len(vals)} values for {count} inputs")
    return vals


def _check_densities(densities: Sequence[float], count: int) -> list[float]:
    d = _check_floats(densities, "densities", count)
    for i, di in enumerate(d):
        if not di > 0.0:  # also catches NaN
            raise ValueError(f"densities[{i}]: density must be in (0, 1], got {di}")
    return d


def _check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads: must be an int >= 0 (0 = OpenMP default), got {threads!r}")
    return threads


def _election_code(election: str) -> int:
    if election not in _ELECTIONS:
        raise ValueError(f"election: must be 'sum' or 'count', got {election!r}")
    return _ELECTIONS[election]


def _consensus_code(consensus: str | None) -> int:
    try:
        return _CONSENSUS[consensus]
    except (KeyError, TypeError):
        raise ValueError(f"consensus: must be 'sum', 'count' or None, got {consensus!r}") from None


def _seed64(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    return seed & ((1 << 64) - 1)  # as methods/rng.py: the seed modulo 2^64


def _key63(key: int) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 1 << 64:
        raise ValueError(f"key: expected an int in [0, 2^64) (the tensor name's hash), got {key!r}")
    return key


def _check_select_topk(select_topk: float) -> float:
    v = float(select_topk)
    if not 0.0 < v <= 1.0:  # also catches NaN
        raise ValueError(f"select_topk: must be in (0, 1], got {select_topk}")
    return v


def _check_nearswap_t(t: float) -> float:
    t = float(t)
    if not t >= NEARSWAP_MIN_T:  # (NaN too)
        raise ValueError(f"t: the kernel covers t >= {NEARSWAP_MIN_T} (the clamp form), got {t}")
    return t


def _cpu_ext() -> Any:
    if _C is None:
        raise RuntimeError(f"fastmerge._C is not available: {LOAD_ERRORS.get('_C', 'not loaded')}")
    return _C


def weighted_delta_sum(
    out: Any, inputs: Sequence[Any], base: Any | None, weights: Sequence[float], divisor: float | None,
    lam: float = 1.0, threads: int = 0,
) -> None:
    """``out = [base +] lam · Σ_i w_i·(x_i [− base]) [/ divisor]`` in fp32, one rounding into ``out``.

    Serves ``linear`` (``base=None``; ``divisor`` = the fp32 sum of the weights, or None) and
    ``task_arithmetic``. Per element the op order is exactly the references': ``acc = 0``;
    ``acc = acc + w_i * (x_i - b)`` in model order; ``/ divisor``; ``* lam`` (if lam != 1); ``b + acc``.
    All buffers: CPU, contiguous, same number of elements, float32/float16/bfloat16 (may differ).
    ``threads``: 0 = OpenMP default; the result does not depend on it. Releases the GIL.
    """
    bufs = _buffers(out, inputs, base, None)
    w = _check_floats(weights, "weights", len(inputs))
    div = 0.0 if divisor is None else float(divisor)
    if divisor is not None and div == 0.0:
        raise ValueError("divisor: 0 would divide by zero (pass None for no division)")
    _cpu_ext().weighted_delta_sum(*bufs, w, div, float(lam), _check_threads(threads))


def ties(
    out: Any, inputs: Sequence[Any], base: Any, weights: Sequence[float], densities: Sequence[float],
    normalize: bool, lam: float = 1.0, election: str = "sum", exact_k: bool = False, threads: int = 0,
    rescale: bool = False,
) -> None:
    """Fused TIES-merging (trim, elect sign, disjoint merge) in fp32, one rounding into ``out``.

    Same maths as ``fastmerge.methods.ties``: each model keeps its ``k_i = max(1, int(density_i · numel))``
    largest ``|x_i − base|`` (density >= 1 keeps all); ``exact_k=False`` keeps every value equal to the k-th
    largest, ``exact_k=True`` keeps exactly k, breaking ties at the threshold by index order
    (``selection: topk``). ``election``: "sum" or "count". ``rescale``: L1-rescale each trimmed delta
    (one more read of the inputs). The thresholds of all models are found together in one read of the
    inputs (a sampled bracket, then a selection among ~3% of the elements; no sort), exact.

    CUDA tensors run ``fastmerge._C_cuda`` (radix-select thresholds, three histogram passes; the same
    per-element formulas, so the same bits as the CPU kernel) on torch's current stream, asynchronously
    as any torch operation (the thresholds are decided on the device); ``threads`` is then unused.
    """
    dev = _device(out)
    bufs = _buffers(out, inputs, base, "TIES", dev)
    flags = (
        _check_floats(weights, "weights", len(inputs)), _check_densities(densities, len(inputs)), bool(normalize),
        float(lam), _election_code(election), bool(exact_k),
    )
    if dev == "cuda":
        import torch

        ok, why = cuda_usable()
        if not ok:
            raise RuntimeError(f"fastmerge._C_cuda is not usable: {why}")
        # scratch from torch's caching allocator (no cudaMalloc/cudaFree inside the kernel: counted in torch's
        # statistics and the GPU engine's budget, backends.cuda.scratch_bytes)
        scratch = torch.empty(_C_cuda.ties_scratch_bytes(bufs[2], len(inputs)), dtype=torch.uint8, device=out.device)
        _C_cuda.ties(*bufs, *flags, torch.cuda.current_stream().cuda_stream, bool(rescale), scratch.data_ptr(),
                     scratch.numel())
    else:
        _cpu_ext().ties(*bufs, *flags, _check_threads(threads), bool(rescale))


def ties_segments(
    out: Any, inputs: Sequence[Any], base: Any, offsets: Sequence[int], weights: Sequence[float],
    densities: Sequence[float], normalize: bool, lam: float = 1.0, election: str = "sum", exact_k: bool = False,
    threads: int = 0, rescale: bool = False,
) -> None:
    """``ties`` on each segment ``[offsets[s], offsets[s + 1])`` of packed CPU buffers, bit-identical to one
    ``ties`` call per segment (each its own k): the engine's batches of small tensors (engine/stream.py).
    ``offsets`` start at 0 and end at the buffers' element count."""
    bufs = _buffers(out, inputs, base, "TIES")
    offs = [int(o) for o in offsets]
    if not offs or offs[0] != 0 or offs[-1] != bufs[2]:
        raise ValueError(f"offsets: must run from 0 to the {bufs[2]} elements of out, got {offs[:1]}..{offs[-1:]}")
    _cpu_ext().ties_segments(bufs[0], bufs[1], offs, *bufs[3:], _check_floats(weights, "weights", len(inputs)),
                             _check_densities(densities, len(inputs)), bool(normalize), float(lam),
                             _election_code(election), bool(exact_k), _check_threads(threads), bool(rescale))


def dare(
    out: Any, inputs: Sequence[Any], base: Any, weights: Sequence[float], densities: Sequence[float],
    consensus: str | None, normalize: bool, lam: float, rescale: bool, seed: int, key: int, threads: int = 0,
) -> None:
    """Fused DARE (``dare_ties``: ``consensus="sum"``; ``dare_linear``: ``None``) into ``out``.

    Same maths and the same random mask as ``fastmerge.methods.dare`` for one ``seed`` and ``key`` (the
    tensor name's hash): element j of model i is kept iff ``u(seed, key, i, j) < fp32(density_i)``
    (``fastmerge.methods.rng``); density >= 1 keeps the delta whole. ``rescale``: mergekit's L1 rule.
    """
    bufs = _buffers(out, inputs, base, "this method")
    _cpu_ext().dare(
        *bufs, _check_floats(weights, "weights", len(inputs)), _check_densities(densities, len(inputs)),
        _consensus_code(consensus), bool(normalize), float(lam), bool(rescale), _seed64(seed), _key63(key),
        _check_threads(threads),
    )


def sce(out: Any, inputs: Sequence[Any], base: Any, select_topk: float = 1.0, threads: int = 0) -> None:
    """Fused SCE (default mode) into ``out``: ``fastmerge.methods.sce``'s variance selection
    (``select_topk`` < 1), matrix-level weights and sign-elected disjoint mean, fp32 math, one rounding.

    The weights' mean squares are summed in double and rounded once (see ``csrc/include/fastmerge/sce.h``)."""
    bufs = _buffers(out, inputs, base, "this method")
    _cpu_ext().sce(*bufs, _check_select_topk(select_topk), _check_threads(threads))


def nearswap(out: Any, x: Any, base: Any, t: float, threads: int = 0) -> None:
    """NearSwap in default mode into ``out``: ``min(max(base − t, x), base + t)`` in fp32 (NaN propagates
    as in torch.maximum/minimum), one rounding; ``t`` >= 1e-6 (smaller t: the reference's weighted form)."""
    out_ptr, out_code, n = _buffer(out, "out", None)
    x_ptr, x_code, _ = _buffer(x, "x", n, fp8=True)
    if base is None:
        raise ValueError("base: NearSwap needs a base model tensor, got None")
    base_ptr, base_code, _ = _buffer(base, "base", n, fp8=True)
    _cpu_ext().nearswap(out_ptr, out_code, n, x_ptr, x_code, base_ptr, base_code, _check_nearswap_t(t),
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
    out: Any, inputs: Sequence[Any], base: Any, weights: Sequence[float], densities: Sequence[float],
    epsilons: Sequence[float], consensus: str | None, normalize: bool, lam: float, rescale: bool, seed: int,
    key: int, threads: int = 0, shape: Sequence[int] | None = None,
) -> None:
    """Fused DELLA (``della``: ``consensus="sum"``; ``della_linear``: ``None``) into ``out``.

    Same maths and the same mask as ``fastmerge.methods.della`` (default mode): per row of the tensor's
    shape (``della_rows``: ``shape``, else ``out.shape``; a raw view has none), ascending |δ| ranks (16-bit
    keys when model and base share a 16-bit dtype) give keep probabilities ``(density − ε) +
    2ε·rank/(n − 1)``, compared with the counter-based uniforms of ``fastmerge.methods.rng``. Ranks come
    from a stable radix sort per row, not a comparison sort.
    """
    shape = shape if shape is not None else getattr(out, "shape", None)
    if shape is None:
        raise ValueError("della ranks |delta| per row: a raw view needs the tensor's shape (shape=)")
    bufs = _buffers(out, inputs, base, "this method")
    _cpu_ext().della(
        *bufs, _check_floats(weights, "weights", len(inputs)), _check_densities(densities, len(inputs)),
        _check_floats(epsilons, "epsilons", len(inputs)), _consensus_code(consensus), bool(normalize), float(lam),
        bool(rescale), _seed64(seed), _key63(key), *della_rows(shape), _check_threads(threads),
    )


def breadcrumbs(
    out: Any, inputs: Sequence[Any], base: Any, weights: Sequence[float], densities: Sequence[float],
    gammas: Sequence[float], consensus: str | None, normalize: bool, lam: float, rescale: bool, topk: bool,
    threads: int = 0,
) -> None:
    """Fused Model Breadcrumbs (``breadcrumbs_ties``: ``consensus="sum"``; ``breadcrumbs``: ``None``).

    Same maths as ``fastmerge.methods.breadcrumbs``: each model keeps the band of ascending |δ| ranks
    ``[n_bot, n_bot + target)``; ``topk=False`` keeps every |δ| tied at a band boundary, ``topk=True``
    exactly ``target`` entries (ties by index order). The two boundaries of every model are found in one
    read of the inputs (no sort).
    """
    bufs = _buffers(out, inputs, base, "this method")
    w = _check_floats(weights, "weights", len(inputs))
    d = _check_densities(densities, len(inputs))
    g = _check_floats(gammas, "gammas", len(inputs))
    for i, gi in enumerate(g):
        if not 0.0 <= gi <= 1.0:
            raise ValueError(f"gammas[{i}]: gamma must be in [0, 1], got {gi}")
    _cpu_ext().breadcrumbs(
        *bufs, w, d, g, _consensus_code(consensus), bool(normalize), float(lam), bool(rescale), bool(topk),
        _check_threads(threads),
    )


def copy(out: Any, x: Any) -> None:
    """``out = x``, bytes copied (same dtype and size; passthrough on raw views: no kernel, no torch)."""
    import ctypes

    out_ptr, out_code, n = _buffer(out, "out", None)
    x_ptr, x_code, _ = _buffer(x, "x", n)
    if x_code != out_code:
        raise ValueError("x: a byte copy needs the dtype of out (a conversion goes through torch)")
    ctypes.memmove(out_ptr, x_ptr, n * _ITEMSIZE[out_code])


def any_nonfinite(x: Any) -> bool:
    """Whether ``x`` (a contiguous CPU tensor or a raw view) holds an inf or a NaN: one pass over its bits,
    GIL released (the engine's non-finite output warning checks every tensor it writes)."""
    ptr, code, n = _buffer(x, "x", None)
    return bool(_cpu_ext().any_nonfinite(ptr, code, n))


def kth_largest_abs_diff(x: Any, base: Any | None, k: int, threads: int = 0) -> float:
    """The k-th largest ``|x − base|`` (``|x|`` if ``base`` is None) in fp32, 1 <= k <= numel.

    Equals ``torch.kthvalue((x.float() - base.float()).abs().flatten(), numel - k + 1).values`` (NaN ranks
    largest), found by a two-pass radix select on the fp32 bit patterns."""
    ext = _cpu_ext()
    x_ptr, x_code, n = _buffer(x, "x", None, fp8=True)
    base_ptr, base_code = 0, 0
    if base is not None:
        base_ptr, base_code, _ = _buffer(base, "base", n, fp8=True)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if n == 0:
        raise ValueError("x: empty tensor has no k-th largest value")
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, {n}] (the number of elements), got {k}")
    return float(ext.kth_largest_abs_diff(x_ptr, x_code, base_ptr, base_code, n, k, _check_threads(threads)))


#: PEFT merge modes of ``peft_merge``: the sign election's method ("total", "frequency"), or no election
PEFT_MODES = {"total": 0, "frequency": 1, "weighted_sum": 2}


def peft_prune_rules(inputs: Sequence[Any], k: int, index_ties: bool, threads: int = 0) -> list[tuple[float, int, int]]:
    """PEFT's exactly-k magnitude pruning of each input (``fastmerge.lora.merge_utils``), as ``(threshold, cut,
    status)``: element j is kept iff ``|x| > threshold`` or ``|x| == threshold and j <= cut``. The thresholds of
    all inputs come from one read (the sampled selection of ``ties``). status 1: that rule does not keep what
    the torch path keeps (the k-th |x| is a NaN, NaNs leave fewer than k with ``|x| >= threshold``, or ties at
    the threshold with ``index_ties`` False, where PEFT's topk decides). ``1 <= k < numel``."""
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or len(inputs) == 0:
        raise ValueError("inputs: need a non-empty sequence of tensors")
    n = _buffer(inputs[0], "inputs[0]", None)[2]
    ins = [_buffer(x, f"inputs[{i}]", n) for i, x in enumerate(inputs)]
    return [(float(t), int(c), int(s)) for t, c, s in _cpu_ext().peft_prune_rules(
        ins[0][2], [p for p, _, _ in ins], [c for _, c, _ in ins], int(k), bool(index_ties), _check_threads(threads))]


def peft_merge(out: Any, inputs: Sequence[Any], rules: Sequence[tuple[float, int, bool]], weights: Sequence[float],
               mode: str, ilp_a: Sequence[int] = (), ilp_c: Sequence[int] = (), threads: int = 0) -> None:
    """PEFT's TIES disjoint merge (``mode`` "total" / "frequency": the sign election's method) or weighted sum
    ("weighted_sum") of K pruned inputs into the float32 ``out``, bit-identical to the torch code of
    ``fastmerge.lora.merge_utils``. ``rules[i] = (threshold, cut, keep_all)`` (``peft_prune_rules``; keep_all:
    the input as it is). ``ilp_a`` / ``ilp_c``: flat ``[start, end)`` pairs of the elements whose majority sum /
    weighted sums torch adds in its interleaved order (``merge_utils._torch_sum_ilp_ranges``)."""
    out_ptr, out_code, n = _buffer(out, "out", None)
    if out_code != 0:
        raise TypeError("out: must be float32 (torch computes the merge in float32)")
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or len(inputs) == 0:
        raise ValueError("inputs: need a non-empty sequence of tensors")
    ins = [_buffer(x, f"inputs[{i}]", n) for i, x in enumerate(inputs)]
    if len({c for _, c, _ in ins}) != 1:
        raise TypeError("inputs: must share one dtype (torch stacks them)")
    if mode not in PEFT_MODES:
        raise ValueError(f"mode: must be one of {sorted(PEFT_MODES)}, got {mode!r}")
    if len(rules) != len(inputs):
        raise ValueError(f"rules: got {len(rules)} for {len(inputs)} inputs")
    w = _check_floats(weights, "weights", len(inputs))
    _cpu_ext().peft_merge(out_ptr, n, [p for p, _, _ in ins], [c for _, c, _ in ins], [float(r[0]) for r in rules],
                          [int(r[1]) for r in rules], [bool(r[2]) for r in rules], w, PEFT_MODES[mode], ins[0][1],
                          [int(v) for v in ilp_a], [int(v) for v in ilp_c], _check_threads(threads))
