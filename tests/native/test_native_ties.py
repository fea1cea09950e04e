"""fastmerge._C ties beyond tests/native/test_native_ops.py: the L1 rescale, the one-read selection of all
models' thresholds (kth_largest_abs_diff_multi: sampled bracket, candidates, nth_element, radix fallback),
the raw entry point, and the CUDA kernel where a GPU exists. See native_cases.py for the conventions."""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.api import merge_tensors
from fastmerge.methods import get_method
from fastmerge.methods.ties import TiesParams
from native_cases import (
    BF16, BIG, DENSITIES, DT_ID, DTYPES, F16, F32, WEIGHTS, check_bit_exact, check_close, exact_norms, make_case,
    outputs_for_threads, poisoned, quantised_case, raw, run_native,
)

pytestmark = pytest.mark.skipif(
    not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}"
)

C = _native._C
CODE = {F32: 0, F16: 1, BF16: 2}


def params(T: int, selection: str = "threshold", election: str = "sum", rescale: bool = True,
           normalize: bool = True, lam: float = 1.0) -> TiesParams:
    return TiesParams(weight=WEIGHTS[:T], density=DENSITIES[:T], normalize=normalize, lambda_=lam,
                      election=election, selection=selection, rescale=rescale)


# ---------------------------------------------------------------------------------------------------------
# rescale


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_ties_rescale_matches_reference(n, T, dtype, selection):
    inputs, base = make_case(n, T, dtype, dtype, seed=n * 7 + T)
    with exact_norms():
        check_bit_exact("ties", params(T, selection), inputs, base, dtype)
        check_bit_exact("ties", params(T, selection, "count", normalize=False, lam=0.6), inputs, base, dtype)


def test_ties_rescale_large_and_mixed():
    inputs, base = make_case(BIG, 3, BF16, BF16, seed=2)
    with exact_norms():
        check_bit_exact("ties", params(3), inputs, base, BF16)
        inputs, base = make_case(4099, 3, [BF16, F32, F16], F16, seed=11)
        for out_dtype in DTYPES:
            check_bit_exact("ties", params(3, "topk"), inputs, base, out_dtype)


def test_ties_rescale_exact_where_torch_sums_are_exact():
    inputs, base = quantised_case((300, 333), 3, seed=2)
    for selection in ("threshold", "topk"):
        check_bit_exact("ties", params(3, selection), inputs, base, BF16)
        # merge_tensors: the engine's entry point, both backends
        kw = dict(weight=[0.5, 0.3, -0.2], density=[0.3, 1.0, 0.5], rescale=True, selection=selection)
        assert torch.equal(merge_tensors("ties", inputs, base, backend="native", **kw),
                           merge_tensors("ties", inputs, base, backend="torch", **kw))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_ID.get)
def test_ties_rescale_close_to_unpatched_reference(dtype):
    inputs, base = make_case((400, 257), 3, dtype, dtype, seed=9)
    check_close("ties", params(3), inputs, base, dtype)


def test_ties_rescale_thread_count_independence():
    inputs, base = make_case(BIG, 3, BF16, BF16, seed=99)
    outs = outputs_for_threads("ties", params(3, "topk"), inputs, base, F16)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------------------------------------------------
# the one-read selection


def expected_kths(x: torch.Tensor, base: torch.Tensor, ks) -> list[tuple[float, int, int, int]]:
    """(k-th largest |x − base|, #bit patterns above, #equal, #NaN) per k, by torch.kthvalue and counts."""
    mag = (x.float() - base.float()).abs().reshape(-1)
    n = mag.numel()
    bits = mag.view(torch.int32)  # sign bit clear: orders like the values, NaN above +inf
    nans = int(mag.isnan().sum())
    out = []
    for k in ks:
        v = torch.kthvalue(mag, n - k + 1).values
        vb = int(v.view(torch.int32))
        out.append((float(v), int((bits > vb).sum()), int((bits == vb).sum()), nans))
    return out


def multi(xs, base, models, ks, threads=0):
    return C.kth_largest_abs_diff_multi(
        [x.data_ptr() for x in xs], [CODE[x.dtype] for x in xs], base.data_ptr(), CODE[base.dtype], base.numel(),
        models, ks, threads,
    )


def same(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] or (a[0] != a[0] and b[0] != b[0])) and a[1:] == b[1:]


@pytest.mark.parametrize("n", [1, 7, 1000, 65536, 65537, 300_001, BIG])
def test_multi_select_matches_kthvalue(n):
    xs, base = make_case(n, 3, [BF16, F32, F16], BF16, seed=n % 1000)
    ks = sorted({1, n, max(1, n // 2), max(1, n // 3), max(1, int(0.01 * n)), max(1, n - 5)})
    models = [m for m in range(3) for _ in ks]
    res, fallbacks = multi(xs, base, models, ks * 3)
    want = [e for x in xs for e in expected_kths(x, base, ks)]
    for (m, k, r, e) in zip(models, ks * 3, res, want):
        assert same(tuple(r), e), (n, m, k)
    if n > 65536:
        assert fallbacks == 0  # the sample's brackets held every k-th value


def test_multi_select_ties_zeros_nans_and_fallback():
    n = 300_001
    xq, bq = quantised_case(n, 2, seed=3)  # 5 magnitudes: single-value brackets
    same_x = bq.clone()  # x == base: every |δ| is 0
    gen = torch.Generator().manual_seed(1)
    two = (bq.float() + torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, 3.0)).to(BF16)  # 2 values, 50/50
    nanx = xq[0].float()
    nanx[::97] = float("nan")
    xs = [xq[0], xq[1], same_x, two, nanx]
    ks = [1, 17, n // 10, n // 2, n - 1, n]
    models = [m for m in range(len(xs)) for _ in ks]
    want = [e for x in xs for e in expected_kths(x, bq, ks)]
    for threads in (1, 2):
        res, fallbacks = multi(xs, bq, models, ks * len(xs), threads)
        for (m, k, r, e) in zip(models, ks * len(xs), res, want):
            assert same(tuple(r), e), (m, k)
        assert fallbacks >= 1  # the 50/50 model's brackets span both values: radix select, still exact


def clustered_case(n: int, seed: int):
    """|δ| that the counting select (select.cpp rth_largest) must resolve in several rounds: a third spread
    over ~60 binades, a dense cluster of distinct values near 1 (a whole first-round bin), and a heavily
    tied block near 0.5 (bf16-style duplicates, as the benchmark family's deltas)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen).to(BF16)
    third = n // 3
    wide = torch.exp2(torch.empty(third).uniform_(-30, 30, generator=gen))
    cluster = 1.0 + torch.arange(third, dtype=torch.float32) * 2.0**-22
    tied = 0.5 + torch.randint(0, 40, (n - 2 * third,), generator=gen).float() * 2.0**-9
    delta = torch.cat([wide, cluster, tied])
    delta = delta[torch.randperm(n, generator=gen)] * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return [base.float() + delta], base


@pytest.mark.parametrize("n", [65_536, 300_001])  # every |δ| (no sample), and the sampled brackets
def test_counting_select_matches_kthvalue_on_clustered_and_tied_data(n):
    xs, base = clustered_case(n, seed=n % 97)
    third = n // 3
    # ranks in the wide part, deep in the cluster (several rounds), in the tied block (exact bins), edges
    ks = [1, third // 2, third + 5, third + third // 2, 2 * third - 1, 2 * third + 3, n - (n - 2 * third) // 2, n]
    want = expected_kths(xs[0], base, ks)
    for threads in (1, 2):
        res, _ = multi(xs, base, [0] * len(ks), ks, threads)
        for k, r, e in zip(ks, res, want):
            assert same(tuple(r), e), (n, k, threads)


def test_multi_select_thread_count_independence():
    xs, base = make_case(BIG, 3, BF16, BF16, seed=5)
    ks = [1, 1000, BIG // 2, BIG - 7]
    models = [m for m in range(3) for _ in ks]
    runs = [multi(xs, base, models, ks * 3, t)[0] for t in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2]


# ---------------------------------------------------------------------------------------------------------
# entry points, scratch


def test_ties_on_raw_views_matches_tensors():
    inputs, base = make_case(5000, 3, BF16, BF16, seed=1)
    p = params(3, "topk", "count")
    typed = run_native("ties", p, inputs, base, BF16)
    out = poisoned(5000, BF16)
    _native.ties(raw(out), [raw(x) for x in inputs], raw(base), p.weight, p.density, p.normalize, p.lambda_, "count",
                 True, 0, True)
    assert torch.equal(out, typed)
    with pytest.raises(ValueError, match=r"election: must be 'sum' or 'count', got 'mean'"):
        _native.ties(raw(out), [raw(base)], raw(base), [1.0], [0.5], True, 1.0, "mean", False)
    with pytest.raises(ValueError, match=r"inputs\[0\]: has 4999 elements, expected 5000"):
        _native.ties(raw(out), [raw(base[:4999])], raw(base), [1.0], [0.5], True)
    with pytest.raises(TypeError, match=r"out: dtype must be float32, float16 or bfloat16, got 'float64'"):
        _native.ties(raw(out.double()), [raw(base)], raw(base), [1.0], [0.5], True)


def test_every_kernel_reuses_its_scratch():
    from fastmerge.methods.breadcrumbs import BreadcrumbsParams
    from fastmerge.methods.dare import DareParams
    from fastmerge.methods.della import DellaParams

    inputs, base = make_case((300, 1001), 3, BF16, BF16, seed=1)
    runs = [
        ("ties", params(3, "topk")),
        ("dare_ties", DareParams(weight=(0.5,) * 3, density=(0.3,) * 3, seed=1, key=2)),
        ("della", DellaParams(weight=(0.5,) * 3, density=(0.4,) * 3, epsilon=(0.1,) * 3, seed=1, key=2)),
        ("breadcrumbs_ties", BreadcrumbsParams(weight=(0.5,) * 3, density=(0.4,) * 3, gamma=(0.01,) * 3,
                                               rescale=True, selection="topk")),
    ]
    for method, p in runs:
        run_native(method, p, inputs, base, BF16, threads=2)
    before = C.scratch_bytes()
    assert before > 0
    small, sbase = make_case(999, 3, F32, F32, seed=2)
    for _ in range(2):
        for method, p in runs:
            run_native(method, p, inputs, base, BF16, threads=2)
            run_native(method, p, small, sbase, F32, threads=2)
    assert C.scratch_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# CUDA (runs only where a GPU and the CUDA extension are present)


@pytest.mark.gpu
@pytest.mark.skipif(not _native.cuda_usable()[0], reason=f"CUDA extension not usable: {_native.cuda_usable()[1]}")
@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_ID.get)
def test_cuda_ties_matches_reference(out_dtype, selection):
    for (n, T, in_dt, seed) in ((BIG, 3, BF16, 21), (4099, 5, [BF16, F32, F16, BF16, F32], 22), (7, 2, F16, 23)):
        inputs, base = make_case(n, T, in_dt, BF16, seed=seed)
        for rescale in (False, True):
            p = params(T, selection, rescale=rescale)
            with exact_norms():
                expected = get_method("ties").reference(inputs, base, p).to(out_dtype)
            out = torch.full((n,), float("nan"), dtype=out_dtype, device="cuda")
            _native.ties(out, [x.cuda() for x in inputs], base.cuda(), p.weight, p.density, p.normalize,
                         p.lambda_, p.election, selection == "topk", 0, rescale)
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), expected), (n, T, rescale)
    xq, bq = quantised_case(100_003, 2, seed=4)  # heavy ties at the threshold: the exact-k cut
    p = TiesParams(weight=(1.0, 0.5), density=(0.37, 0.6), selection=selection)
    out = torch.full((100_003,), float("nan"), dtype=out_dtype, device="cuda")
    _native.ties(out, [x.cuda() for x in xq], bq.cuda(), p.weight, p.density, True, 1.0, "sum",
                 selection == "topk", 0, False)
    assert torch.equal(out.cpu(), get_method("ties").reference(xq, bq, p).to(out_dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not _native.cuda_usable()[0], reason=f"CUDA extension not usable: {_native.cuda_usable()[1]}")
@pytest.mark.parametrize("kw", [dict(weight=[0.3, -0.2, 0.6], density=[0.5, 0.2, 1.0]),
                                dict(weight=0.33, density=0.3, selection="topk", election="count"),
                                dict(weight=0.33, density=0.3, rescale=True, **{"lambda": 0.7})])
def test_cuda_backend_through_merge_tensors(kw):
    """``backend="cuda"`` (backends/cuda.py: the default for ties on a GPU) equals the reference bit for bit."""
    from fastmerge import merge_tensors

    g = torch.Generator().manual_seed(5)
    b = torch.randn(1031, 1537, generator=g) * 0.02
    xs = [(b + 0.002 * torch.randn(1031, 1537, generator=g)).bfloat16() for _ in range(3)]
    with exact_norms():
        want = merge_tensors("ties", xs, b.bfloat16(), backend="torch", **kw)
    got = merge_tensors("ties", xs, b.bfloat16(), backend="cuda", **kw)
    assert torch.equal(got, want)
