"""fastmerge._C dare (dare_linear, dare_ties) against the torch reference, and the C++ port of the
counter-based generator (csrc/include/fastmerge/rng.h) against fastmerge/methods/rng.py, bit for bit.

See native_cases.py for the conventions (NaN-poisoned outputs; ``exact_norms`` for the rescale)."""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.api import merge_tensors
from fastmerge.methods import rng
from fastmerge.methods.dare import DareParams
from native_cases import (
    BF16, BIG, DENSITIES, DT_ID, DTYPES, F16, F32, WEIGHTS, check_bit_exact, check_close, exact_norms, make_case,
    outputs_for_threads, poisoned, quantised_case, raw, run_native,
)

pytestmark = pytest.mark.skipif(
    not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}"
)

C = _native._C
M64 = (1 << 64) - 1


def params(T: int, rescale: bool, seed: int = 7, key: int = 0x1234_5678_9ABC, normalize: bool = False,
           lam: float = 1.0) -> DareParams:
    return DareParams(weight=WEIGHTS[:T], density=DENSITIES[:T], normalize=normalize, lambda_=lam, rescale=rescale,
                      seed=seed, key=key)


# ---------------------------------------------------------------------------------------------------------
# the generator


@pytest.mark.parametrize("seed,key,model,start", [
    (0, 1, 0, 0),
    (42, 0x7FFF_FFFF_FFFF_FFFF, 3, 12345),
    (-1, 99, 1, 0),  # a negative seed is taken modulo 2^64, as rng.stream_keys does
    (2**64 + 5, 5, 0, 2**32 - 700),  # the run crosses the 2^32 boundary of the element index (hi word)
])
def test_rng_hash_matches_torch_generator(seed, key, model, start):
    n = 3001
    ref = rng.hash_u32(seed, key, model, n, start)
    out = torch.empty(n, dtype=torch.int32)
    C.rng_hash(out.data_ptr(), n, start, seed & M64, key, model)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 1 / 3, 0.5, 0.9, 0.99999994, 1.0, 1.5, -0.2])
def test_rng_scalar_keep_matches_keep_mask(p):
    n = 20_011
    ref = rng.keep_mask(11, 777, 2, p, n)
    out = torch.empty(n, dtype=torch.uint8)
    C.rng_keep(out.data_ptr(), n, 0, 11, 777, 2, p)
    assert torch.equal(out.bool(), ref)


# ---------------------------------------------------------------------------------------------------------
# the kernel against the reference


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_dare_matches_reference_small(method, dtype, T, n):
    inputs, base = make_case(n, T, dtype, dtype, seed=n * 10 + T)
    check_bit_exact(method, params(T, rescale=False), inputs, base, dtype)
    check_bit_exact(method, params(T, rescale=False, normalize=True, lam=0.8), inputs, base, dtype)
    with exact_norms():
        check_bit_exact(method, params(T, rescale=True, seed=3), inputs, base, dtype)


@pytest.mark.parametrize("method,dtype,rescale", [
    ("dare_ties", BF16, True),
    ("dare_linear", F16, False),
    ("dare_linear", F32, True),
])
def test_dare_matches_reference_large(method, dtype, rescale):
    inputs, base = make_case((1027, 1021), 3, dtype, dtype, seed=5)  # 1048567 elements: odd rows
    with exact_norms():
        check_bit_exact(method, params(3, rescale=rescale, lam=1.3), inputs, base, dtype)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_ID.get)
def test_dare_mixed_dtypes(out_dtype):
    inputs, base = make_case((37, 111), 3, [BF16, F32, F16], F16, seed=11)
    with exact_norms():
        for method in ("dare_linear", "dare_ties"):
            check_bit_exact(method, params(3, rescale=True, normalize=method == "dare_linear"), inputs, base, out_dtype)


def test_dare_rescale_exact_where_torch_sums_are_exact():
    # deltas in multiples of 1/4: torch's fp32 norms are exact sums too, so no patch is needed
    inputs, base = quantised_case((300, 333), 3, seed=2)
    for method in ("dare_linear", "dare_ties"):
        check_bit_exact(method, params(3, rescale=True), inputs, base, BF16)
        check_bit_exact(method, params(3, rescale=True), inputs, base, F32)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_ID.get)
def test_dare_rescale_close_to_unpatched_reference(dtype):
    inputs, base = make_case((400, 257), 3, dtype, dtype, seed=9)
    for method in ("dare_linear", "dare_ties"):
        check_close(method, params(3, rescale=True), inputs, base, dtype)


def test_same_mask_on_torch_and_native_for_one_seed():
    # one model, weight 1, no rescale: out − base is the kept delta, so the kept set is visible
    n = 50_003
    inputs, base = make_case(n, 1, F32, F32, seed=4)
    key = 0x0BAD_CAFE
    for density in (0.1, 0.33, 0.9):
        p = DareParams(weight=(1.0,), density=(density,), rescale=False, seed=42, key=key)
        out = run_native("dare_linear", p, inputs, base, F32)
        kept = (out - base) != 0
        delta_nonzero = (inputs[0] - base) != 0
        assert torch.equal(kept, rng.keep_mask(42, key, 0, density, n) & delta_nonzero)
    # the engine's entry point: merge_tensors on both backends, same tensor name and seed
    x, b = make_case((64, 129), 3, BF16, BF16, seed=8)
    kw = dict(weight=[0.5, 0.3, -0.2], density=[0.3, 0.6, 0.9], rescale=False, seed=123, tensor_name="layers.0.w")
    for method in ("dare_linear", "dare_ties"):
        a = merge_tensors(method, x, b, backend="native", **kw)
        t = merge_tensors(method, x, b, backend="torch", **kw)
        assert torch.equal(a, t)


def test_dare_thread_count_independence():
    inputs, base = make_case(BIG, 3, BF16, BF16, seed=99)
    for method in ("dare_ties", "dare_linear"):
        outs = outputs_for_threads(method, params(3, rescale=True), inputs, base, F16)
        assert all(torch.equal(outs[0], o) for o in outs[1:]), method


def test_dare_raw_entry_point_matches_typed():
    inputs, base = make_case(5000, 3, BF16, BF16, seed=1)
    p = params(3, rescale=True)
    typed = run_native("dare_ties", p, inputs, base, BF16)
    out = poisoned(5000, BF16)
    _native.dare(raw(out), [raw(x) for x in inputs], raw(base), p.weight, p.density, "sum", p.normalize, p.lambda_,
                 p.rescale, p.seed, p.key)
    assert torch.equal(out, typed)


def test_dare_wrapper_errors():
    x, b, out = torch.randn(7), torch.randn(7), torch.empty(7)
    args = ([0.5], [0.5])
    with pytest.raises(ValueError, match=r"consensus: must be 'sum', 'count' or None, got 'mean'"):
        _native.dare(out, [x], b, *args, "mean", False, 1.0, True, 0, 1)
    with pytest.raises(ValueError, match=r"densities\[0\]: density must be in \(0, 1\], got 0.0"):
        _native.dare(out, [x], b, [0.5], [0.0], None, False, 1.0, True, 0, 1)
    with pytest.raises(ValueError, match=r"key: expected an int in \[0, 2\^64\)"):
        _native.dare(out, [x], b, *args, None, False, 1.0, True, 0, -1)
    with pytest.raises(TypeError, match=r"seed: expected an int, got float"):
        _native.dare(out, [x], b, *args, None, False, 1.0, True, 0.5, 1)
    with pytest.raises(ValueError, match=r"base: this method needs a base"):
        _native.dare(out, [x], None, *args, None, False, 1.0, True, 0, 1)
    with pytest.raises(ValueError, match=r"consensus: must be 0 \(sum\), 1 \(count\) or 2 \(none\)"):
        C.dare(out.data_ptr(), 0, 7, [x.data_ptr()], [0], b.data_ptr(), 0, [1.0], [0.5], 5, False, 1.0, True, 0, 1)
