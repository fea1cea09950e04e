"""fastmerge._C della (della, della_linear) against the torch reference (default mode), bit for bit: the
per-row ranks (16-bit keys for same-dtype 16-bit inputs, fp32 keys otherwise), the keep probabilities,
the counter-based mask and the tail. See native_cases.py for the conventions."""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.api import merge_tensors
from fastmerge.backends.base import MergeJob
from fastmerge.backends.native import NativeBackend
from fastmerge.methods import get_method
from fastmerge.methods.della import DellaParams
from native_cases import (
    BF16, DT_ID, DTYPES, F16, F32, WEIGHTS, check_bit_exact, check_close, exact_norms, make_case,
    outputs_for_threads, poisoned, quantised_case, raw, run_native,
)

pytestmark = pytest.mark.skipif(
    not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}"
)

DENS = (0.5, 0.3, 1.0, 0.7, 0.2)  # density ± epsilon inside (0, 1), one model kept whole
EPS = (0.1, 0.2, 0.1, 0.25, 0.15)


def params(method: str, T: int, rescale: bool, seed: int = 5, key: int = 987654321, lam: float = 1.0) -> DellaParams:
    return DellaParams(weight=WEIGHTS[:T], density=DENS[:T], epsilon=EPS[:T], normalize=method == "della",
                       lambda_=lam, rescale=rescale, seed=seed, key=key)


SHAPES = [(1,), (7,), (1, 1), (3, 1), (5, 7), (33, 1031), (2, 3, 4, 5), (2, 1, 3), (1000,)]


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_della_matches_reference(method, dtype, shape):
    T = 3
    inputs, base = make_case(shape, T, dtype, dtype, seed=len(shape) * 31 + shape[-1])
    check_bit_exact(method, params(method, T, rescale=False), inputs, base, dtype)
    with exact_norms():
        check_bit_exact(method, params(method, T, rescale=True, lam=0.7), inputs, base, dtype)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_ID.get)
def test_della_mixed_dtypes_rank_fp32_keys(out_dtype):
    # x and base of different dtypes: the reference ranks the fp32 |δ| (rank_dtype), and so must the kernel
    inputs, base = make_case((19, 257), 3, [BF16, F32, F16], F16, seed=12)
    with exact_norms():
        for method in ("della", "della_linear"):
            check_bit_exact(method, params(method, 3, rescale=True), inputs, base, out_dtype)


def test_della_tied_keys_rank_by_index():
    # |δ| takes 5 values: every row is a long run of equal keys, ranked in index order
    inputs, base = quantised_case((64, 515), 3, seed=3)
    for method in ("della", "della_linear"):
        check_bit_exact(method, params(method, 3, rescale=True), inputs, base, BF16)  # exact norms here
        check_bit_exact(method, params(method, 3, rescale=False), inputs, base, F32)


@pytest.mark.parametrize("method,dtype,shape", [
    ("della", BF16, (1024, 1027)),
    ("della_linear", F32, (256, 4099)),
])
def test_della_matches_reference_large(method, dtype, shape):
    inputs, base = make_case(shape, 3, dtype, dtype, seed=77)
    with exact_norms():
        check_bit_exact(method, params(method, 3, rescale=True), inputs, base, dtype)


def test_della_rescale_close_to_unpatched_reference():
    inputs, base = make_case((300, 301), 3, BF16, BF16, seed=13)
    check_close("della", params("della", 3, rescale=True), inputs, base, BF16)
    inputs, base = make_case((300, 301), 3, F32, F32, seed=14)
    check_close("della_linear", params("della_linear", 3, rescale=True), inputs, base, F32)


def test_della_same_on_both_backends():
    x, b = make_case((48, 200), 3, BF16, BF16, seed=2)
    kw = dict(weight=[0.5, 0.3, -0.2], density=[0.4, 0.6, 0.5], epsilon=0.1, rescale=False, seed=9,
              tensor_name="model.layers.3.mlp.up_proj.weight")
    for method in ("della", "della_linear"):
        assert torch.equal(merge_tensors(method, x, b, backend="native", **kw),
                           merge_tensors(method, x, b, backend="torch", **kw))


def test_della_thread_count_independence():
    inputs, base = make_case((515, 2053), 3, BF16, BF16, seed=21)
    for method in ("della", "della_linear"):
        outs = outputs_for_threads(method, params(method, 3, rescale=True), inputs, base, BF16)
        assert all(torch.equal(outs[0], o) for o in outs[1:]), method


def test_della_run_raw_needs_the_shape_and_matches_run():
    shape = (6, 35, 3)
    inputs, base = make_case(shape, 3, BF16, BF16, seed=6)
    p = params("della", 3, rescale=True)
    job = MergeJob("t", get_method("della"), p, False)
    typed = run_native("della", p, inputs, base, BF16)
    out = poisoned(shape, BF16)

    with pytest.raises(ValueError, match=r"tensor 't': della ranks \|delta\| per row: a raw view needs the tensor's shape"):
        NativeBackend().run_raw(job, raw(out), [raw(x) for x in inputs], raw(base), 0)
    NativeBackend().run_raw(job, raw(out), [raw(x) for x in inputs], raw(base), 0, shape=shape)
    assert torch.equal(out, typed)


def test_della_wrapper_errors():
    x, b, out = torch.randn(7), torch.randn(7), torch.empty(7)
    with pytest.raises(ValueError, match=r"epsilons: got 2 values for 1 inputs"):
        _native.della(out, [x], b, [1.0], [0.5], [0.1, 0.1], "sum", True, 1.0, True, 0, 1)
    with pytest.raises(ValueError, match=r"rows: outer x row_len x inner = 6, expected n = 7"):
        _native._C.della(out.data_ptr(), 0, 7, [x.data_ptr()], [0], b.data_ptr(), 0, [1.0], [0.5], [0.1], 0, True,
                         1.0, True, 0, 1, 2, 3, 1)
    assert _native.della_rows(()) == (1, 1, 1)
    assert _native.della_rows((5,)) == (1, 5, 1)
    assert _native.della_rows((4, 6)) == (4, 6, 1)
    assert _native.della_rows((2, 3, 4, 5)) == (2, 3, 20)
