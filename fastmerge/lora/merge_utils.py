"""PEFT's ``peft.utils.merge_utils`` functions with PEFT's exact semantics (task tensors stacked on dim 0;
exactly-k magnitude pruning by ``topk``; the sign election on the *unweighted* pruned tensors; a disjoint
mean over an unweighted count; DARE masks from ``torch.bernoulli`` on the global generator, drawn in the
same order, so a seed gives PEFT's masks), without PEFT. Used by ``lora.adapters`` (adapter merging).

Same results as PEFT's functions bit for bit (tests/lora/test_adapters.py), with fewer full-size temporaries:
the weights are applied while summing instead of on a stacked copy, and the sign mask is computed once.

On contiguous CPU tensors (float32/bfloat16/float16, 2 to 16 of them, fp32 weights) the merge step after the
pruning runs in one native kernel (``_native.peft_merge``, csrc/cpu/peft_ties.cpp) on the K tensors as they
are, with the pruning expressed as a threshold and a tie cut per tensor (``_native.peft_prune_rules``, one read
of all K): bit-identical to the torch code below, which stays the reference and the path for everything else
(tests/lora/test_peft_native.py). The torch code stacks the K tensors and makes ~30 full passes over the
stack; it took 14.7 of the 17 s of a ``ties_svd`` ``add_weighted_adapter`` call on 8 ΔW's of a 1B-shaped layer.
"""

from __future__ import annotations

import platform
import warnings
from typing import Sequence

from .._lazy import torch


#: False: always the torch code (the reference; tests compare the two)
USE_NATIVE = True
#: torch's sum(dim=0) splits its columns across at most this many rows' worth of one order (K <= 16: input order)
_MAX_NATIVE_INPUTS = 16
#: at::internal::GRAIN_SIZE: torch reduces on one thread below this many input elements
_TORCH_GRAIN = 32768
_lanes_cache: list[int | None] = []


def _torch_float_lanes() -> int | None:
    """Lanes of torch's ``Vectorized<float>`` in the kernels it dispatches to (its CPU capability): the column
    blocking of its sums depends on it. None where not known (non-x86 builds): the torch path runs."""
    if not _lanes_cache:
        lanes = None
        if platform.machine().lower() in ("x86_64", "amd64"):
            try:
                cap = torch.backends.cpu.get_cpu_capability()
            except (AttributeError, RuntimeError):
                cap = None
            lanes = {"AVX512": 16, "AVX2": 8, "DEFAULT": 8}.get(cap)
        _lanes_cache.append(lanes)
    return _lanes_cache[0]


def _torch_sum_ilp_ranges(n: int, rows: int, elem_size: int, lanes: int, threads: int) -> list[int]:
    """The columns of ``stack.sum(dim=0)`` (a contiguous [rows, n] tensor of ``elem_size``-byte elements) that
    torch adds in its 4-way interleaved order, as flat [start, end) pairs; the other columns it adds in row
    order from +0 (rows <= 16). torch (SumKernel.cpp cascade_sum, TensorIteratorReduce.cpp): above GRAIN_SIZE
    elements and with several threads, the n columns are split into ceil(n / threads) chunks whose bounds are
    rounded down to 128 bytes (the last end kept); in each chunk of L columns, vectorized_outer_sum (L >= the
    lanes of Vectorized<scalar_t>) sums blocks of 4 float vectors in row order (multi_row_sum) and the rest
    with row_sum (interleaved); below that, scalar_outer_sum sums groups of 4 columns in row order and the
    last L % 4 with row_sum. With fewer than 4 rows both orders are the same."""
    if rows < 4:
        return []
    if rows * n < _TORCH_GRAIN or threads <= 1:
        chunks = [(0, n)]
    else:
        nt = min(threads, n)
        size = -(-n // nt)
        mult = 128 // elem_size
        chunks = []
        for t in range(nt):
            b, e = t * size, min(n, (t + 1) * size)
            if b >= n:
                continue
            b -= b % mult
            if e != n:
                e -= e % mult
            if b != e:
                chunks.append((b, e))
    vec = lanes * 4 // elem_size  # Vectorized<scalar_t>::size()
    out: list[int] = []
    for b, e in chunks:
        length = e - b
        start = b + (length // (4 * lanes)) * 4 * lanes if length >= vec else b + (length // 4) * 4
        if start < e:
            out += [start, e]
    return out


def _native_weights(tensors: Sequence[torch.Tensor], weights) -> list[float] | None:
    """The fp32 weights when the native kernel computes what the torch code does for these tensors, else None:
    1..16 contiguous CPU tensors of one shape and dtype (float32/bfloat16/float16), at least 2 elements (with
    one, torch's sum runs its inner-reduction order), fp32 weights (the stack of any of these dtypes times
    fp32 weights is fp32; other weight dtypes round elsewhere)."""
    if not USE_NATIVE or not 1 <= len(tensors) <= _MAX_NATIVE_INPUTS:
        return None
    t0 = tensors[0]
    if not isinstance(t0, torch.Tensor) or t0.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t0.numel() < 2:
        return None
    for t in tensors:
        if (not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != t0.dtype or t.shape != t0.shape
                or not t.is_contiguous()):
            return None
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(list(weights))
    if w.dtype != torch.float32 or w.dim() != 1 or w.numel() != len(tensors) or _torch_float_lanes() is None:
        return None
    try:
        from .. import _native

        if not _native.HAS_CPU_EXT:
            return None
    except ImportError:
        return None
    if not _agrees_with_torch(t0.dtype):
        return None
    return [float(v) for v in w.detach().cpu().tolist()]


_agreement: dict[tuple, bool] = {}


def _agrees_with_torch(dtype: torch.dtype) -> bool:
    """Whether the kernel gives the torch code's bits on this torch, for ``dtype`` at the current thread count
    and vector width: checked once per such key on small probes that reach both of torch's summation orders
    (one thread's chunk below the grain size, several chunks with their interleaved tails above it), every mode.
    The kernel reproduces the order of torch's ``sum(dim=0)`` (``_torch_sum_ilp_ranges``), an internal of
    torch verified on 2.13; where a torch version sums otherwise, this finds it and the torch code runs (with one
    warning) rather than results that differ from PEFT's in the last bit."""
    key = (dtype, torch.get_num_threads(), _torch_float_lanes(), torch.__version__)
    got = _agreement.get(key)
    if got is None:
        got = True
        g = torch.Generator().manual_seed(12345)
        try:
            for rows, n in ((7, 1001), (9, 2 * _TORCH_GRAIN // 9 + 77)):
                xs = [(torch.randn(n, generator=g) * torch.randint(0, 2, (n,), generator=g)).to(dtype) for _ in range(rows)]
                w = torch.rand(rows, generator=g) * 2 - 0.5
                for mode in ("total", "frequency", "weighted_sum"):
                    fast = _native_merge(xs, [_KEEP_ALL] * rows, [float(v) for v in w.tolist()], mode)
                    stacked = torch.stack(xs, dim=0)
                    ref = _combine_stacked(stacked, w, mode)
                    if not torch.equal(fast.view(torch.int32), ref.float().view(torch.int32)):
                        got = False
        except Exception:  # noqa: BLE001 - any failure of the probe: the torch code
            got = False
        _agreement[key] = got
        if not got:
            warnings.warn(f"fastmerge: the native PEFT merge kernel does not reproduce torch {torch.__version__}'s "
                          f"summation order for {dtype} here; PEFT's merges run on the torch code", stacklevel=3)
    return got


def _native_merge(tensors: Sequence[torch.Tensor], rules: Sequence[tuple[float, int, bool]], weights: list[float],
                  mode: str) -> torch.Tensor:
    """``_ties_of`` / ``_weighted_sum`` of the pruned stack, by the native kernel (``_native_weights`` passed)."""
    from .. import _native

    if mode not in ("total", "frequency", "weighted_sum"):
        raise RuntimeError(f'Unimplemented mask method "{mode}"')
    t0 = tensors[0]
    n, k = t0.numel(), len(tensors)
    lanes, threads = _torch_float_lanes(), torch.get_num_threads()
    # the majority sum is over the stack in the inputs' dtype; the weighted sums over fp32 products
    ilp_a = _torch_sum_ilp_ranges(n, k, t0.element_size(), lanes, threads) if mode == "total" else []
    ilp_c = _torch_sum_ilp_ranges(n, k, 4, lanes, threads)
    out = torch.empty(t0.shape, dtype=torch.float32)
    _native.peft_merge(out, list(tensors), rules, weights, mode, ilp_a, ilp_c)
    return out


_KEEP_ALL = (0.0, 0, True)


def _native_pruned(tensors: Sequence[torch.Tensor], density: float, topk_ties: bool) -> tuple[list, list]:
    """(inputs, rules) for ``_native_merge`` equal to ``[_prune(t, density, "magnitude", False, topk_ties)]``:
    a threshold and tie cut per tensor from one read of all of them; a tensor whose kept set the threshold does
    not give (topk's ties, NaN) is pruned by the torch code and enters whole."""
    if density >= 1:
        for _ in tensors:
            warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=3)
        return list(tensors), [_KEEP_ALL] * len(tensors)
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    n = tensors[0].numel()
    k = int(density * n)
    if k == 0:  # topk(k=0): every element times 0 (NaN and inf become NaN)
        return list(tensors), [(float("inf"), -1, False)] * len(tensors)
    if k >= n:  # topk(k=n): every element times 1
        return list(tensors), [_KEEP_ALL] * len(tensors)
    from .. import _native

    inputs, rules = list(tensors), []
    for i, (th, cut, status) in enumerate(_native.peft_prune_rules(inputs, k, index_ties=not topk_ties)):
        if status:
            inputs[i] = _magnitude_pruning(inputs[i], density, topk_ties)
            rules.append(_KEEP_ALL)
        else:
            rules.append((th, cut, False))
    return inputs, rules


def _combine(tensors: Sequence[torch.Tensor], weights, mode: str) -> torch.Tensor:
    """The merge step on already-pruned tensors: ``_ties_of`` (mode = the sign method) or ``_weighted_sum``
    ("weighted_sum"), natively where ``_native_weights`` allows."""
    w = _native_weights(tensors, weights)
    if w is not None:
        return _native_merge(tensors, [_KEEP_ALL] * len(tensors), w, mode)
    return _combine_stacked(torch.stack(list(tensors), dim=0), weights, mode)


def _combine_pruned(tensors: Sequence[torch.Tensor], weights, density: float, topk_ties: bool, mode: str) -> torch.Tensor:
    """``_combine`` of the magnitude-pruned tensors (``_prune``); natively, the pruning is a threshold and a tie cut
    per tensor from one read of them all (``_native_pruned``)."""
    w = _native_weights(tensors, weights)
    if w is not None:
        return _native_merge(*_native_pruned(tensors, density, topk_ties), w, mode)
    return _combine_stacked(torch.stack([_prune(t, density, "magnitude", False, topk_ties) for t in tensors], dim=0),
                            weights, mode)


def _combine_stacked(stacked: torch.Tensor, weights, mode: str) -> torch.Tensor:
    """The torch code of the merge step: ``_ties_of`` (mode = the sign method) or ``_weighted_sum``."""
    return _weighted_sum(stacked, weights) if mode == "weighted_sum" else _ties_of(stacked, weights, mode)


def _w(weights: Sequence[float] | torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(list(weights))
    return w.to(t.device).view(w.shape + (1,) * (t.dim() - w.dim()))


def _kth_largest_abs(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| as a 0-d tensor: the native radix select on contiguous CPU floats (one read, no
    sort; ``_native.kth_largest_abs_diff``), else ``torch.kthvalue``."""
    flat = tensor.reshape(-1)
    if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            from .. import _native

            return torch.tensor(_native.kth_largest_abs_diff(flat, None, k), dtype=torch.float32)
        except (ImportError, RuntimeError):
            pass
    return torch.kthvalue(flat.abs().float(), flat.numel() - k + 1).values


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's exactly-k magnitude pruning, bit for bit (``_magnitude_pruning`` with topk deciding ties)."""
    return _magnitude_pruning(tensor, density, topk_ties=True)


def _magnitude_pruning(tensor: torch.Tensor, density: float, topk_ties: bool) -> torch.Tensor:
    """PEFT's exactly-k magnitude pruning. PEFT keeps ``topk(|x|, k)``, a sort of every element (28 s for 8
    tensors of 2048×5632 on the busy 2-core machine); the k-th largest |x| by selection (the native radix
    select, one read) and ``|x| ≥ t`` give the same set whenever exactly k elements pass, which is checked.
    Otherwise (ties at the threshold, NaN) PEFT's topk decides (``topk_ties``), so the result is PEFT's bit for
    bit; or, with ``topk_ties=False``, the tied elements are cut by index order (the first ones kept): the same
    magnitudes, without topk's full sort. Ties at the k-th |x| are common: 13 of 56 fp32 ΔW's of a 1B-shaped
    layer (11.5M elements, density 0.5) had one, and their topk fallbacks were 8.7 of the 20 s of a ties_svd."""
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    if 0 < k < flat.numel():
        t = _kth_largest_abs(tensor, k)
        mag = flat.abs()
        keep = mag >= t.to(flat.dtype)  # t is one of the |x|: exact in their dtype
        n = int(torch.count_nonzero(keep))
        if n == k:
            return tensor * keep.to(tensor.dtype).reshape(tensor.shape)
        if not topk_ties and n > k and not bool(torch.isnan(t)):
            tied = torch.nonzero(mag == t.to(flat.dtype)).reshape(-1)
            keep[tied[tied.numel() - (n - k):]] = False
            return tensor * keep.to(tensor.dtype).reshape(tensor.shape)
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    return _prune(tensor, density, method, rescale, topk_ties=True)


def _prune(tensor: torch.Tensor, density: float, method: str, rescale: bool, topk_ties: bool) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=2)
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return _magnitude_pruning(tensor, density, topk_ties)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: str = "total") -> torch.Tensor:
    sign = tensor.sign()
    if method == "total":
        mag = tensor.sum(dim=0)
    elif method == "frequency":
        mag = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return sign == torch.where(mag >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def _weighted_sum(stacked: torch.Tensor, weights) -> torch.Tensor:
    return (stacked * _w(weights, stacked)).sum(dim=0)


def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights) -> torch.Tensor:
    return _combine(task_tensors, weights, "weighted_sum")


def magnitude_prune(task_tensors: Sequence[torch.Tensor], weights, density: float) -> torch.Tensor:
    return magnitude_prune_index_ties(task_tensors, weights, density, topk_ties=True)


def magnitude_prune_index_ties(task_tensors: Sequence[torch.Tensor], weights, density: float, topk_ties: bool = False) -> torch.Tensor:
    """``magnitude_prune`` with ties at each tensor's threshold cut by index order (``_magnitude_pruning``)."""
    return _combine_pruned(task_tensors, weights, density, topk_ties, "weighted_sum")


def _ties_of(stacked: torch.Tensor, weights, majority_sign_method: str) -> torch.Tensor:
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(stacked * _w(weights, stacked), mask)


def ties(task_tensors: Sequence[torch.Tensor], weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    return ties_index_ties(task_tensors, weights, density, majority_sign_method, topk_ties=True)


def ties_index_ties(task_tensors: Sequence[torch.Tensor], weights, density: float, majority_sign_method: str = "total",
                    topk_ties: bool = False) -> torch.Tensor:
    """``ties`` with ties at each tensor's magnitude threshold cut by index order (``_magnitude_pruning``)."""
    return _combine_pruned(task_tensors, weights, density, topk_ties, majority_sign_method)


def dare_linear(task_tensors: Sequence[torch.Tensor], weights, density: float) -> torch.Tensor:
    return _combine([prune(t, density, "random", rescale=True) for t in task_tensors], weights, "weighted_sum")


def dare_ties(task_tensors: Sequence[torch.Tensor], weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    # the masks are torch.bernoulli draws (PEFT's, in its order); the merge step takes the pruned tensors
    return _combine([prune(t, density, "random", rescale=True) for t in task_tensors], weights, majority_sign_method)


#: combination type of ``add_weighted_adapter`` -> the function applied to its task tensors
FUNCTIONS = {
    "linear": task_arithmetic, "svd": task_arithmetic, "ties": ties, "ties_svd": ties, "dare_linear": dare_linear,
    "dare_linear_svd": dare_linear, "dare_ties": dare_ties, "dare_ties_svd": dare_ties, "magnitude_prune": magnitude_prune,
    "magnitude_prune_svd": magnitude_prune,
}
