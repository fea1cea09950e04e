"""fastmerge._C (C++ CPU kernels) against the torch references, bit for bit.

The references in ``fastmerge.methods`` are the specification: fp32 math with a fixed op order, one
rounding at the end. The kernels follow the same op order, so ``native == reference(...).to(out_dtype)``
must hold exactly (``torch.equal``), for every dtype combination, size and thread count. ``out`` is filled
with NaN before each call so that an element the kernel forgot to write cannot pass.
"""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.methods import get_method
from fastmerge.methods.linear import LinearParams, weight_divisor
from fastmerge.methods.task_arithmetic import TaskArithmeticParams
from fastmerge.methods.ties import TiesParams, keep_count

pytestmark = pytest.mark.skipif(
    not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}"
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, BF16, F16]
DT_ID = {F32: "f32", F16: "f16", BF16: "bf16"}
BIG = 2**20 + 3  # not a multiple of the 1024-element blocks, nor of any thread count's share
SIZES = [1, 7, 1000, BIG]

# per-model parameters, sliced to T models: mixed-sign weights (the sign election has work to do) and
# densities including 1.0 (keep everything) and a tiny one (k = 1 on small tensors)
WEIGHTS = (0.7, -0.4, 1.1, 0.35, -0.9)
DENSITIES = (0.5, 0.2, 1.0, 0.9, 0.05)


def randn(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=gen).to(dtype)


def make_case(n: int, T: int, in_dtypes, base_dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(in_dtypes, torch.dtype):
        in_dtypes = [in_dtypes] * T
    inputs = [randn(n, dt, gen) for dt in in_dtypes]
    base = randn(n, base_dtype, gen)
    return inputs, base


def poisoned(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=dtype)


def run_native(method: str, out, inputs, base, params, threads: int = 0) -> None:
    """Calls the kernel the native backend uses for ``method`` (argument mapping only, no maths)."""
    if method == "linear":
        div = weight_divisor(params.weight, params.normalize)
        _native.weighted_delta_sum(out, inputs, None, params.weight, div, 1.0, threads)
    elif method == "task_arithmetic":
        div = weight_divisor(params.weight, params.normalize)
        _native.weighted_delta_sum(out, inputs, base, params.weight, div, params.lambda_, threads)
    elif method == "ties":
        _native.ties(
            out, inputs, base, params.weight, params.density, params.normalize, params.lambda_,
            params.election, params.selection == "topk", threads,
        )
    else:
        raise AssertionError(method)


def check_bit_exact(method: str, inputs, base, params, out_dtype, threads: int = 0) -> torch.Tensor:
    n = inputs[0].numel()
    ref = get_method(method).reference(inputs, base, params)
    assert ref.dtype == torch.float32
    expected = ref.to(out_dtype)
    out = poisoned(n, out_dtype)
    run_native(method, out, inputs, base, params, threads)
    if not torch.equal(out, expected):
        bad = (out != expected).nonzero().flatten()
        i = int(bad[0])
        raise AssertionError(
            f"{method}: {bad.numel()} of {n} elements differ from the reference; first at [{i}]: "
            f"native {out[i].item()!r} vs reference {expected[i].item()!r} (fp32 {ref[i].item()!r})"
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# dtype conversions: every fp16 / bf16 bit pattern, and a dense sweep of fp32 patterns


def assert_same_values(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit equality except NaN payloads (torch's own CPU conversions disagree on those between its scalar
    and vectorised paths); NaN-ness must match."""
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan), f"{what}: NaN positions differ"
    o, e = out[~nan], expected[~nan]
    if not torch.equal(o.view(torch.int16 if o.element_size() == 2 else torch.int32),
                       e.view(torch.int16 if e.element_size() == 2 else torch.int32)):
        bad = (o != e) | (torch.signbit(o) != torch.signbit(e))
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} values differ, e.g. {o[i].item()!r} vs {e[i].item()!r}")


@pytest.mark.parametrize("in_dtype", [F16, BF16], ids=DT_ID.get)
def test_every_half_pattern_converts_like_torch(in_dtype):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(in_dtype)
    p = LinearParams(weight=(1.0,), normalize=False)  # out = 0 + 1 * x: the conversions alone
    for out_dtype in DTYPES:
        expected = get_method("linear").reference([x], None, p).to(out_dtype)
        out = poisoned(x.numel(), out_dtype)
        run_native("linear", out, [x], None, p)
        assert_same_values(out, expected, f"{DT_ID[in_dtype]} -> {DT_ID[out_dtype]}")


def test_fp32_patterns_round_like_torch():
    # every 251st fp32 bit pattern (17M values: all exponents, mantissas near every rounding boundary
    # pattern modulo 251), plus the exact boundaries of fp16/bf16 overflow, subnormals and ties
    sweep = torch.arange(0, 2**32, 251, dtype=torch.int64)
    edges = torch.tensor(
        [0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000, 0x33000000, 0x33000001, 0x387FFFFF, 0x38800000,
         0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0x3F808000, 0x3F818000, 0x00000001, 0x00800000],
        dtype=torch.int64,
    )
    bits = torch.cat([sweep, edges, edges | 0x80000000])
    x = bits.to(torch.int32).view(F32)  # int64 -> int32 wraps to the same 32 bits
    p = LinearParams(weight=(1.0,), normalize=False)
    for out_dtype in (F16, BF16):
        expected = get_method("linear").reference([x], None, p).to(out_dtype)
        out = poisoned(x.numel(), out_dtype)
        run_native("linear", out, [x], None, p)
        assert_same_values(out, expected, f"f32 -> {DT_ID[out_dtype]}")


# ---------------------------------------------------------------------------------------------------------
# linear / task_arithmetic: weighted_delta_sum


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("n", SIZES)
def test_weighted_delta_sum_matches_reference(n, T, dtype):
    inputs, base = make_case(n, T, dtype, dtype, seed=n * 10 + T)
    w = WEIGHTS[:T]
    check_bit_exact("linear", inputs, None, LinearParams(weight=w, normalize=True), dtype)
    check_bit_exact("linear", inputs, None, LinearParams(weight=w, normalize=False), dtype)
    p = TaskArithmeticParams(weight=w, normalize=False, lambda_=1.0)
    check_bit_exact("task_arithmetic", inputs, base, p, dtype)
    check_bit_exact("task_arithmetic", inputs, base, TaskArithmeticParams(weight=w, normalize=True, lambda_=0.6), dtype)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_ID.get)
def test_weighted_delta_sum_mixed_dtypes(out_dtype):
    inputs, base = make_case(1000, 3, [F32, BF16, F16], BF16, seed=7)
    w = (0.3, 0.5, 0.25)
    check_bit_exact("linear", inputs, None, LinearParams(weight=w), out_dtype)
    check_bit_exact("task_arithmetic", inputs, base, TaskArithmeticParams(weight=w, lambda_=1.3), out_dtype)
    inputs, base = make_case(1000, 2, [F16, F32], F32, seed=8)
    check_bit_exact("task_arithmetic", inputs, base, TaskArithmeticParams(weight=(0.5, 0.5), normalize=True), out_dtype)


def test_weighted_delta_sum_negative_zero_and_output_aliasing():
    # 0 + (-0) = +0 in the reference (acc starts at +0.0 and really adds): the kernel must not skip it
    x = torch.tensor([-0.0, 1.0, -2.5], dtype=F32)
    out = poisoned(3, F32)
    _native.weighted_delta_sum(out, [x], None, [1.0], None)
    assert torch.equal(out, get_method("linear").reference([x], None, LinearParams(weight=(1.0,), normalize=False)))
    assert not torch.signbit(out[0])
    # out may be one of the inputs (each block reads its inputs before it stores)
    inputs, base = make_case(5000, 2, BF16, BF16, seed=3)
    p = TaskArithmeticParams(weight=(0.5, 0.8), lambda_=0.9)
    expected = get_method("task_arithmetic").reference(inputs, base, p).to(BF16)
    run_native("task_arithmetic", inputs[0], inputs, base, p)
    assert torch.equal(inputs[0], expected)


# ---------------------------------------------------------------------------------------------------------
# ties


def ties_params(T: int, selection: str, election: str, normalize: bool = True, lam: float = 1.0) -> TiesParams:
    return TiesParams(
        weight=WEIGHTS[:T], density=DENSITIES[:T], normalize=normalize, lambda_=lam,
        election=election, selection=selection,
    )


@pytest.mark.parametrize("election", ["sum", "count"])
@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_ties_matches_reference_small(n, T, dtype, selection, election):
    inputs, base = make_case(n, T, dtype, dtype, seed=n * 100 + T)
    check_bit_exact("ties", inputs, base, ties_params(T, selection, election), dtype)


@pytest.mark.parametrize(
    "T,dtype,selection,election,normalize,lam",
    [
        (3, BF16, "threshold", "sum", True, 1.0),
        (3, BF16, "topk", "sum", True, 1.0),
        (3, BF16, "threshold", "count", False, 0.8),
        (3, BF16, "topk", "count", True, 1.5),
        (5, F16, "topk", "sum", True, 1.0),
        (2, F32, "threshold", "sum", False, 1.0),
        (1, F32, "topk", "count", True, 1.0),
    ],
)
def test_ties_matches_reference_large(T, dtype, selection, election, normalize, lam):
    inputs, base = make_case(BIG, T, dtype, dtype, seed=T)
    check_bit_exact("ties", inputs, base, ties_params(T, selection, election, normalize, lam), dtype)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_ID.get)
def test_ties_mixed_dtypes(out_dtype, selection):
    inputs, base = make_case(4099, 3, [BF16, F32, F16], F16, seed=11)
    check_bit_exact("ties", inputs, base, ties_params(3, selection, "sum", lam=0.7), out_dtype)
    check_bit_exact("ties", inputs, base, ties_params(3, selection, "count", normalize=False), out_dtype)


def quantised_case(n: int, seed: int):
    """bf16 base and one input whose deltas are multiples of 0.25 in [-1, 1]: huge numbers of ties in |δ|.
    Every value is exact in bf16, so out − base recovers the kept deltas exactly."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randint(-16, 16, (n,), generator=gen) * 0.5 + 0.25).to(BF16)
    q = torch.randint(-4, 5, (n,), generator=gen) * 0.25
    x = (base.float() + q).to(BF16)
    assert torch.equal(x.float() - base.float(), q)
    return x, base


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.8])
def test_ties_exact_k_keeps_exactly_k_with_ties(density):
    n = 100_003
    x, base = quantised_case(n, seed=int(density * 100))
    mag = (x.float() - base.float()).abs()
    k = keep_count(density, n)
    th = torch.kthvalue(mag, n - k + 1).values
    assert th > 0 and int((mag == th).sum()) > k // 10  # the threshold is a heavily tied, non-zero value
    for selection in ("topk", "threshold"):
        p = TiesParams(weight=(1.0,), density=(density,), normalize=True, lambda_=1.0, selection=selection)
        out = check_bit_exact("ties", [x], base, p, BF16)
        kept = int((out.float() - base.float() != 0).sum())
        if selection == "topk":
            assert kept == k
        else:
            assert kept == int((mag >= th).sum()) > k
    # the ties kept in exact-k mode are the first ones in index order, whatever the thread count
    p = TiesParams(weight=(1.0,), density=(density,), selection="topk")
    outs = []
    for threads in (1, 2, 3):
        out = poisoned(n, BF16)
        run_native("ties", out, [x], base, p, threads)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    kept_ties = ((outs[0].float() - base.float()).abs() == th).nonzero().flatten()
    assert torch.equal(kept_ties, (mag == th).nonzero().flatten()[: kept_ties.numel()])


def test_ties_nan_inputs_do_not_crash_and_match_reference():
    gen = torch.Generator().manual_seed(5)
    n = 3000
    x0, x1, base = randn(n, F32, gen), randn(n, F32, gen), randn(n, F32, gen)
    x0[[3, 1500, 2999]] = float("nan")
    # NaN ranks largest: with k <= 3 the threshold is NaN and the model keeps nothing; above, NaNs are not
    # kept (float comparisons, as the reference's `mag >= threshold`)
    for d0 in (0.0005, 0.001, 0.3, 1.0):
        for selection in ("threshold", "topk"):
            for election in ("sum", "count"):
                p = TiesParams(weight=(0.5, -0.3), density=(d0, 0.5), election=election, selection=selection)
                ref = get_method("ties").reference([x0, x1], base, p)
                out = poisoned(n, F32)
                run_native("ties", out, [x0, x1], base, p)
                torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# selection


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("n", SIZES)
def test_kth_largest_abs_diff_matches_kthvalue(n, dtype):
    gen = torch.Generator().manual_seed(n)
    x, base = randn(n, dtype, gen), randn(n, dtype, gen)
    mag = (x.float() - base.float()).abs()
    ks = sorted({1, n, max(1, n // 2), max(1, n // 3), max(1, int(0.1 * n))})
    for k in ks:
        expected = torch.kthvalue(mag, n - k + 1).values.item()
        assert _native.kth_largest_abs_diff(x, base, k) == expected, (n, k)
    # without a base: |x|
    k = max(1, n // 4)
    assert _native.kth_largest_abs_diff(x, None, k) == torch.kthvalue(x.float().abs(), n - k + 1).values.item()


def test_kth_largest_abs_diff_special_values():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -3.0, 1e-45, -1e-45, float("nan"), 2.0])
    mag = x.abs()
    n = x.numel()
    for k in range(1, n + 1):
        expected = torch.kthvalue(mag, n - k + 1).values
        got = _native.kth_largest_abs_diff(x, None, k)
        assert (got != got and bool(expected.isnan())) or got == expected.item(), k
    # heavy ties, mixed dtypes, threads
    x, base = quantised_case(50_001, seed=1)
    mag = (x.float() - base.float()).abs()
    for k in (1, 10, 25_000, 50_001):
        expected = torch.kthvalue(mag, 50_001 - k + 1).values.item()
        for threads in (1, 2, 3):
            assert _native.kth_largest_abs_diff(x, base.float(), k, threads=threads) == expected


# ---------------------------------------------------------------------------------------------------------
# threads


def test_thread_count_independence():
    inputs, base = make_case(BIG, 3, BF16, BF16, seed=99)
    x_q, base_q = quantised_case(BIG, seed=4)
    runs = {
        "task_arithmetic": (inputs, base, TaskArithmeticParams(weight=(0.3, -0.6, 0.9), normalize=True, lambda_=0.7)),
        "linear": (inputs, None, LinearParams(weight=(0.2, 0.3, 0.5))),
        "ties": (inputs, base, ties_params(3, "topk", "count", lam=1.2)),
        "ties_ties": ([x_q, inputs[1]], base_q, TiesParams(weight=(1.0, 0.5), density=(0.3, 0.6), selection="topk")),
    }
    for name, (xs, b, p) in runs.items():
        method = "ties" if name.startswith("ties") else name
        outs = []
        for threads in (1, 2, 3):
            out = poisoned(BIG, F16)
            run_native(method, out, xs, b, p, threads)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), name
    kth = [_native.kth_largest_abs_diff(inputs[0], base, 12345, threads=t) for t in (1, 2, 3)]
    assert kth[0] == kth[1] == kth[2]


def test_scratch_is_reused_in_steady_state():
    inputs, base = make_case(300_001, 3, BF16, BF16, seed=1)
    p = ties_params(3, "topk", "sum")
    out = poisoned(300_001, BF16)
    run_native("ties", out, inputs, base, p, threads=2)
    before = _native._C.scratch_bytes()
    assert before > 0
    for _ in range(3):
        run_native("ties", out, inputs, base, p, threads=2)
    small, sbase = make_case(999, 3, F32, F32, seed=2)
    run_native("ties", poisoned(999, F32), small, sbase, p, threads=2)
    assert _native._C.scratch_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# wrapper checks and module state


def test_wrapper_errors_name_the_argument():
    x = torch.randn(7)
    b = torch.randn(7)
    out = torch.empty(7)
    with pytest.raises(TypeError, match=r"inputs\[1\]: dtype must be float32, float16 or bfloat16, got torch.float64"):
        _native.weighted_delta_sum(out, [x, x.double()], None, [0.5, 0.5], None)
    with pytest.raises(TypeError, match=r"out: dtype must be"):
        _native.ties(torch.empty(7, dtype=torch.int32), [x], b, [1.0], [0.5], True)
    with pytest.raises(ValueError, match=r"inputs\[0\]: must be contiguous"):
        _native.weighted_delta_sum(torch.empty(4), [torch.randn(4, 2)[:, 0]], None, [1.0], None)
    with pytest.raises(ValueError, match=r"base: must be contiguous"):
        _native.ties(torch.empty(4), [torch.randn(4)], torch.randn(4, 2)[:, 1], [1.0], [0.5], True)
    with pytest.raises(ValueError, match=r"inputs\[1\]: has 6 elements, expected 7"):
        _native.weighted_delta_sum(out, [x, torch.randn(6)], b, [0.5, 0.5], None)
    with pytest.raises(ValueError, match=r"base: has 8 elements, expected 7"):
        _native.ties(out, [x], torch.randn(8), [1.0], [0.5], True)
    with pytest.raises(ValueError, match=r"densities\[1\]: density must be in \(0, 1\], got 0.0"):
        _native.ties(out, [x, x], b, [1.0, 1.0], [0.5, 0.0], True)
    with pytest.raises(ValueError, match=r"densities\[0\]: density must be in \(0, 1\], got nan"):
        _native.ties(out, [x], b, [1.0], [float("nan")], True)
    with pytest.raises(ValueError, match=r"weights: got 1 values for 2 inputs"):
        _native.weighted_delta_sum(out, [x, x], None, [1.0], None)
    with pytest.raises(ValueError, match=r"densities: got 3 values for 2 inputs"):
        _native.ties(out, [x, x], b, [1.0, 1.0], [0.5, 0.5, 0.5], True)
    with pytest.raises(ValueError, match=r"base: TIES needs a base"):
        _native.ties(out, [x], None, [1.0], [0.5], True)
    with pytest.raises(ValueError, match=r"election: must be 'sum' or 'count'"):
        _native.ties(out, [x], b, [1.0], [0.5], True, election="mean")
    with pytest.raises(ValueError, match=r"inputs: need at least one"):
        _native.weighted_delta_sum(out, [], None, [], None)
    with pytest.raises(ValueError, match=r"divisor: 0 would divide by zero"):
        _native.weighted_delta_sum(out, [x], None, [1.0], 0.0)
    with pytest.raises(ValueError, match=r"inputs\[0\]: must be a CPU tensor, got device 'meta'"):
        _native.weighted_delta_sum(out, [torch.empty(7, device="meta")], None, [1.0], None)
    with pytest.raises(TypeError, match=r"inputs\[0\]: expected a torch.Tensor, got list"):
        _native.weighted_delta_sum(out, [[1.0] * 7], None, [1.0], None)
    with pytest.raises(ValueError, match=r"threads: must be an int >= 0"):
        _native.weighted_delta_sum(out, [x], None, [1.0], None, threads=-1)
    with pytest.raises(ValueError, match=r"k: must be in \[1, 7\]"):
        _native.kth_largest_abs_diff(x, b, 0)
    with pytest.raises(ValueError, match=r"k: must be in \[1, 7\]"):
        _native.kth_largest_abs_diff(x, None, 8)


def test_raw_module_checks_list_lengths():
    # the raw entry points trust pointers but not list lengths or codes
    x = torch.randn(7)
    with pytest.raises(ValueError, match=r"weights: 1 weights for 2 inputs"):
        _native._C.weighted_delta_sum(x.data_ptr(), 0, 7, [x.data_ptr()] * 2, [0, 0], 0, 0, [1.0], 0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"input_dtypes\[0\]: dtype code must be"):
        _native._C.weighted_delta_sum(x.data_ptr(), 0, 7, [x.data_ptr()], [5], 0, 0, [1.0], 0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"densities\[0\]: density must be > 0"):
        _native._C.ties(x.data_ptr(), 0, 7, [x.data_ptr()], [0], x.data_ptr(), 0, [1.0], [0.0], True, 1.0, 0, False, 0)
    with pytest.raises(ValueError, match=r"k: must be in \[1, n=7\]"):
        _native._C.kth_largest_abs_diff(x.data_ptr(), 0, 0, 0, 7, 9, 0)


def test_missing_extension_raises_runtime_error(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setitem(_native.LOAD_ERRORS, "_C", "ImportError: simulated")
    x = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"fastmerge._C is not available: ImportError: simulated"):
        _native.weighted_delta_sum(torch.empty(3), [x], None, [1.0], None)
    with pytest.raises(RuntimeError, match=r"fastmerge._C is not available"):
        _native.ties(torch.empty(3), [x], x, [1.0], [0.5], True)
    with pytest.raises(RuntimeError, match=r"fastmerge._C is not available"):
        _native.kth_largest_abs_diff(x, None, 1)


def test_module_state_and_report():
    assert _native.BUILD_INFO["_C.fp_contract"] == "off"
    assert isinstance(_native.BUILD_INFO["_C.openmp"], bool)
    ok, why = _native.cuda_usable()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok
    if _native.HAS_CUDA_EXT:
        assert "_C_cuda.cuda_archs" in _native.BUILD_INFO
        if not ok:
            assert why.startswith("cuda") or "device" in why  # e.g. "cudaErrorInsufficientDriver: ..."
    else:
        assert "_C_cuda" in _native.LOAD_ERRORS
    r = _native.report()
    assert r["has_cpu_ext"] is True and r["cuda_usable"] == ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_any_nonfinite_matches_torch_on_every_kind_of_value(dtype):
    """The engine's non-finite output check: one C++ pass over the bits, equal to torch.isfinite."""
    width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    g = torch.Generator().manual_seed(5)
    for n in (0, 1, 4095, 4096, 4097, 3 * 4096 + 11):
        bits = torch.randint(-2**15 if width == torch.int16 else -2**31, 2**15 if width == torch.int16 else 2**31 - 1,
                             (n,), generator=g, dtype=torch.int64).to(width)
        x = bits.view(dtype).clone()
        x[~torch.isfinite(x)] = 0  # random bits: finite only
        assert _native.any_nonfinite(x) is False
        for special in (float("inf"), float("-inf"), float("nan")):
            for at in {0, n // 2, n - 1} if n else ():
                y = x.clone()
                y[at] = special
                assert _native.any_nonfinite(y) is True, (n, special, at)
                assert bool((~torch.isfinite(y)).any()) is True
