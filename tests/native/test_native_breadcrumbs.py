"""fastmerge._C breadcrumbs (breadcrumbs, breadcrumbs_ties) against the torch reference, bit for bit: both
band selections (threshold: boundary ties kept; topk: exactly target, ties by index order), found in one
read of the inputs. See native_cases.py for the conventions."""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.methods import get_method
from fastmerge.methods.breadcrumbs import BreadcrumbsParams, band
from native_cases import (
    BF16, BIG, DT_ID, DTYPES, F16, F32, WEIGHTS, check_bit_exact, check_close, exact_norms, make_case,
    outputs_for_threads, poisoned, quantised_case, raw, run_native,
)

pytestmark = pytest.mark.skipif(
    not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}"
)

# densities incl. 1.0 (kept whole) and 0.05 (target 0 on tiny tensors); gammas incl. 0 (n_bot = N − target)
DENS = (0.5, 0.3, 1.0, 0.9, 0.05)
GAMMAS = (0.01, 0.2, 0.1, 0.0, 0.3)


def params(T: int, selection: str, rescale: bool = False, normalize: bool = False, lam: float = 1.0,
           dens=DENS, gammas=GAMMAS) -> BreadcrumbsParams:
    return BreadcrumbsParams(weight=WEIGHTS[:T], density=dens[:T], gamma=gammas[:T], normalize=normalize,
                             lambda_=lam, rescale=rescale, selection=selection)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_breadcrumbs_matches_reference_small(method, selection, dtype, T, n):
    inputs, base = make_case(n, T, dtype, dtype, seed=n + T)
    check_bit_exact(method, params(T, selection), inputs, base, dtype)
    with exact_norms():
        check_bit_exact(method, params(T, selection, rescale=True, normalize=True, lam=1.2), inputs, base, dtype)


@pytest.mark.parametrize("density,gamma", [(0.1, 0.01), (0.37, 0.2), (0.5, 0.0), (0.8, 0.15), (0.6, 0.4)])
def test_breadcrumbs_band_boundaries_in_heavy_ties(density, gamma):
    # |δ| has 5 values: both band boundaries cut through long runs of equal magnitudes
    n = 100_003
    inputs, base = quantised_case(n, 1, seed=int(density * 100))
    mag = (inputs[0].float() - base.float()).abs()
    n_bot, target = band(n, density, gamma)
    kept = {}
    for selection in ("topk", "threshold"):
        p = BreadcrumbsParams(weight=(1.0,), density=(density,), gamma=(gamma,), selection=selection)
        out = check_bit_exact("breadcrumbs", p, inputs, base, BF16)
        kept[selection] = int(((out.float() - base.float()) != 0).sum())
    # topk keeps exactly `target` entries (a kept δ of 0 is invisible in the output); threshold adds the ties
    assert target - int((mag == 0).sum()) <= kept["topk"] <= target
    assert kept["threshold"] >= kept["topk"]
    with exact_norms():
        check_bit_exact("breadcrumbs_ties", BreadcrumbsParams(weight=(0.7,), density=(density,), gamma=(gamma,),
                        selection="topk", rescale=True), inputs, base, F32)


def test_breadcrumbs_mixed_dtypes_and_several_models_with_ties():
    inputs, base = quantised_case((211, 503), 3, seed=5)
    for selection in ("threshold", "topk"):
        for method in ("breadcrumbs", "breadcrumbs_ties"):
            check_bit_exact(method, params(3, selection), inputs, base, F16)
    inputs, base = make_case((37, 111), 3, [BF16, F32, F16], F16, seed=11)
    for out_dtype in DTYPES:
        check_bit_exact("breadcrumbs_ties", params(3, "topk"), inputs, base, out_dtype)


@pytest.mark.parametrize("method,dtype,selection", [
    ("breadcrumbs", BF16, "threshold"),
    ("breadcrumbs_ties", BF16, "topk"),
    ("breadcrumbs_ties", F32, "threshold"),
])
def test_breadcrumbs_matches_reference_large(method, dtype, selection):
    inputs, base = make_case(BIG, 3, dtype, dtype, seed=3)
    check_bit_exact(method, params(3, selection), inputs, base, dtype)


def test_breadcrumbs_rescale_close_to_unpatched_reference():
    inputs, base = make_case((300, 301), 3, BF16, BF16, seed=13)
    check_close("breadcrumbs_ties", params(3, "threshold", rescale=True), inputs, base, BF16)


def test_breadcrumbs_nan_inputs_match_reference():
    gen = torch.Generator().manual_seed(5)
    n = 3000
    x0, x1, base = (torch.randn(n, generator=gen) for _ in range(3))
    x0[[3, 1500, 2999]] = float("nan")
    for selection in ("threshold", "topk"):
        for gamma in (0.0, 0.0005, 0.1):  # NaN ranks largest: with n_top < 3 the upper boundary is NaN
            p = BreadcrumbsParams(weight=(0.5, -0.3), density=(0.3, 0.5), gamma=(gamma, 0.1), selection=selection)
            ref = get_method("breadcrumbs_ties").reference([x0, x1], base, p)
            out = run_native("breadcrumbs_ties", p, [x0, x1], base, F32)
            torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_breadcrumbs_thread_count_independence():
    inputs, base = make_case(BIG, 3, BF16, BF16, seed=99)
    xq, bq = quantised_case(BIG, 2, seed=4)
    for xs, b in ((inputs, base), (xq, bq)):
        for selection in ("threshold", "topk"):
            p = params(len(xs), selection, rescale=True)
            outs = outputs_for_threads("breadcrumbs_ties", p, xs, b, F16)
            assert all(torch.equal(outs[0], o) for o in outs[1:]), selection


def test_breadcrumbs_raw_entry_point_matches_typed():
    inputs, base = make_case(5000, 3, BF16, BF16, seed=1)
    p = params(3, "topk")
    typed = run_native("breadcrumbs", p, inputs, base, BF16)
    out = poisoned(5000, BF16)
    _native.breadcrumbs(raw(out), [raw(x) for x in inputs], raw(base), p.weight, p.density, p.gamma, None, p.normalize,
                        p.lambda_, p.rescale, True)
    assert torch.equal(out, typed)


def test_breadcrumbs_wrapper_errors():
    x, b, out = torch.randn(7), torch.randn(7), torch.empty(7)
    with pytest.raises(ValueError, match=r"gammas\[0\]: gamma must be in \[0, 1\], got 1.5"):
        _native.breadcrumbs(out, [x], b, [1.0], [0.5], [1.5], None, False, 1.0, False, False)
    with pytest.raises(ValueError, match=r"gammas: got 2 values for 1 inputs"):
        _native.breadcrumbs(out, [x], b, [1.0], [0.5], [0.1, 0.1], None, False, 1.0, False, False)
    with pytest.raises(ValueError, match=r"gammas\[0\]: must be in \[0, 1\]"):
        _native._C.breadcrumbs(out.data_ptr(), 0, 7, [x.data_ptr()], [0], b.data_ptr(), 0, [1.0], [0.5], [-0.1], 2,
                               False, 1.0, False, False)
