"""fastmerge._C nearswap (default mode, t >= 1e-6) against the torch reference ``fastmerge.methods.nearswap``.

See native_cases.py for the conventions (NaN-poisoned outputs, bit-for-bit comparison, NaN matching NaN)."""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.methods import get_method
from fastmerge.methods.nearswap import NearswapParams
from native_cases import BF16, BIG, DT_ID, DTYPES, F16, F32, assert_equal_bits, make_case, poisoned, raw, run_native

pytestmark = pytest.mark.skipif(
    not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}"
)

REF = get_method("nearswap")


def _case(n, x_dt, b_dt, seed):
    (x,), b = make_case(n, 1, x_dt, b_dt, seed=seed, spread=0.01)
    return x, b


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("x_dt,b_dt", [(BF16, BF16), (F32, F32), (F16, BF16), (BF16, F32)], ids=str)
@pytest.mark.parametrize("n", [1, 7, 5000, BIG])
@pytest.mark.parametrize("t", [0.004, 1e-6, 0.5])
def test_nearswap_matches_reference(out_dtype, x_dt, b_dt, n, t):
    """t = 0.004 clamps about a third of the entries (|x − b| ~ N(0, 0.01²)), 0.5 none, 1e-6 nearly all."""
    x, b = _case(n, x_dt, b_dt, seed=n % 97)
    p = NearswapParams(t)
    want = REF.reference([x], b, p).to(out_dtype)
    got = run_native("nearswap", p, [x], b, out_dtype)
    assert_equal_bits(got, want, f"nearswap n={n} t={t}")
    if n == 5000 and t == 0.004:
        clamped = ((x.float() - b.float()).abs() > t).float().mean()
        assert 0.2 < float(clamped) < 0.9  # the case exercises both branches


def test_nearswap_nan_and_inf_inputs():
    x, b = _case(3000, F32, F32, seed=5)
    x[[3, 100]] = float("nan")
    b[[7, 100, 200]] = float("nan")
    x[[11, 12]] = torch.tensor([float("inf"), -float("inf")])
    b[13] = float("inf")
    p = NearswapParams(0.01)
    for odt in DTYPES:
        want = REF.reference([x], b, p).to(odt)
        got = run_native("nearswap", p, [x], b, odt)
        assert bool(got.isnan().eq(want.isnan()).all())
        assert_equal_bits(got, want, f"nearswap nan/inf {odt}")


def test_nearswap_thread_count_independence_and_raw_entry_point():
    x, b = _case(BIG, BF16, BF16, seed=9)
    p = NearswapParams(0.003)
    outs = [run_native("nearswap", p, [x], b, BF16, threads=t) for t in (1, 2, 3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    out = poisoned(BIG, BF16)
    _native.nearswap(raw(out), raw(x), raw(b), p.t, 2)
    assert torch.equal(out, outs[0])


def test_nearswap_small_t_and_compat_stay_on_torch():
    from fastmerge import backends
    from fastmerge.backends.base import MergeJob

    nb = backends.BACKENDS["native"]
    assert not nb.not_supported_reasons(MergeJob("t", REF, NearswapParams(1e-6), False), "cpu")
    assert "t < 1e-06" in " ".join(nb.not_supported_reasons(MergeJob("t", REF, NearswapParams(1e-7), False), "cpu"))
    assert nb.not_supported_reasons(MergeJob("t", REF, NearswapParams(0.1), True), "cpu")  # mergekit_compat
    x, b = _case(7, F32, F32, seed=1)
    with pytest.raises(ValueError, match=r"t: the kernel covers t >= 1e-06"):
        _native.nearswap(torch.empty(7), x, b, 1e-7)
    with pytest.raises(ValueError, match=r"x: has 6 elements, expected 7"):
        _native.nearswap(torch.empty(7), x[:6], b, 0.1)
