"""NaN and ±inf through every Triton merge kernel, against the torch reference (the specification).

The reference's rules at non-finite deltas: a NaN |δ| is above +inf in the selection's order
(``torch.kthvalue``), and a comparison with a NaN threshold is false, so a model whose k-th largest
|δ| *is* NaN (≥ k NaN deltas) keeps nothing (``methods.ties.trim_mask``: ``mag >= NaN``), as the C++
and CUDA kernels do. The Triton kernels once used a NaN threshold as their "keep everything"
sentinel (density ≥ 1) and kept every entry there instead: ``test_ties_k_nan_deltas_keep_nothing``
and ``test_breadcrumbs_nan_lower_bound`` fail on that code. NaN outputs compare equal to NaN
outputs whatever their payload (the interpreter's numpy and torch may carry different payloads).
"""

import math

import pytest
import torch

from fastmerge.methods.base import ParamContext
from fastmerge.methods.breadcrumbs import BreadcrumbsParams
from fastmerge.methods.dare import DareParams
from fastmerge.methods.della import DellaParams
from fastmerge.methods.linear import LinearParams
from fastmerge.methods.model_stock import ModelStockParams
from fastmerge.methods.slerp import SlerpParams
from fastmerge.methods.task_arithmetic import TaskArithmeticParams
from fastmerge.methods.ties import TiesParams, keep_count
from helpers.kernel_cases import DTYPES, IV, needs_triton, packed, poisoned, reference

pytestmark = needs_triton

#: segment 2 of the packed batch is the 33x17 matrix (561 elements) starting at element 8
SEG2 = slice(8, 8 + 561)


def assert_bits_equal_nan(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit-equal everywhere except that any NaN equals any NaN; NaN-ness itself must agree."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    gn, wn = torch.isnan(got), torch.isnan(want)
    bad = (gn != wn).nonzero()
    assert not bad.numel(), (f"{what}: NaN at {bad.numel()} elements differs, first {int(bad[0])}: "
                             f"got {float(got[bad[0]])}, want {float(want[bad[0]])}")
    iv = IV[got.element_size()]
    diff = ((got.view(iv) != want.view(iv)) & ~gn).nonzero()
    assert not diff.numel(), (f"{what}: {diff.numel()} elements differ, first {int(diff[0])}: "
                              f"got {float(got[diff[0]])}, want {float(want[diff[0]])}")


def poison_inputs(x: torch.Tensor, base: torch.Tensor, n_nan: int = 300) -> None:
    """In place: model 0 gets ``n_nan`` NaN entries in segment 2 (≥ k = 224 at density 0.4), model 2 a
    few +inf/-inf entries there and one NaN in segment 3; base gets one inf (its δ is inf − inf = NaN
    in every model, or ±inf)."""
    a = SEG2.start
    x[0, a:a + n_nan] = float("nan")
    x[2, a + 400:a + 405] = float("inf")
    x[2, a + 405:a + 410] = float("-inf")
    x[2, SEG2.stop + 11] = float("nan")
    base[a + 500] = float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_ties_k_nan_deltas_keep_nothing(dtype, selection):
    """≥ k NaN deltas: the k-th largest |δ| is NaN, nothing is kept (the reference, C++ and CUDA)."""
    from fastmerge.kernels.ties import TiesKernel, ties_merge

    x, base, segs = packed(dtype)
    poison_inputs(x, base)
    params = [TiesParams((0.5, -0.3, 1.1), (0.4, 0.5, 0.3), lambda_=1.0, selection=selection) for _ in range(segs.count)]
    assert 300 >= keep_count(0.4, 561)
    kernel = TiesKernel(params, segs.numel, x.device)
    out = kernel.run(x, base, poisoned(segs.total, dtype), segs)
    want = reference("ties", x, base, segs, params, dtype)
    assert_bits_equal_nan(out, want, f"ties {selection} {dtype}")
    # and the point of the case: model 0's threshold in segment 2 is NaN, yet the outputs there are finite
    assert math.isnan(float(kernel.mask.lo[2, 0]))
    assert not torch.isnan(want[SEG2][300:400]).any()
    assert_bits_equal_nan(ties_merge(x, base, poisoned(segs.total, dtype), segs, params), want, "ties_merge")


def test_ties_density_one_still_keeps_nan():
    """density 1 keeps the task vector whole, NaN entries included (the reference's ``ones_like``)."""
    from fastmerge.kernels.ties import ties_merge

    x, base, segs = packed(torch.float32)
    poison_inputs(x, base)
    params = [TiesParams((0.5, -0.3, 1.1), (1.0, 1.0, 0.3), lambda_=1.0) for _ in range(segs.count)]
    out = ties_merge(x, base, poisoned(segs.total, torch.float32), segs, params)
    assert_bits_equal_nan(out, reference("ties", x, base, segs, params, torch.float32), "ties density 1")


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", None), ("breadcrumbs_ties", "sum")])
@pytest.mark.parametrize("n_nan", [300, 561])
def test_breadcrumbs_nan_lower_bound(method, consensus, n_nan):
    """NaN bounds of the band keep nothing: with every delta NaN (561) the lower bound is NaN too."""
    from fastmerge.kernels.breadcrumbs import breadcrumbs_merge

    x, base, segs = packed(torch.float32)
    poison_inputs(x, base, n_nan)
    params = [BreadcrumbsParams((0.5, -0.3, 1.1), (0.4, 0.6, 0.25), (0.01, 0.5, 0.3), lambda_=0.7) for _ in range(segs.count)]
    out = breadcrumbs_merge(x, base, poisoned(segs.total, torch.float32), segs, params, consensus)
    assert_bits_equal_nan(out, reference(method, x, base, segs, params, torch.float32), f"{method} {n_nan} NaN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_task_arithmetic_nonfinite(dtype):
    from fastmerge.kernels.linear import linear_merge, task_arithmetic_merge

    x, base, segs = packed(dtype, tied=False)
    poison_inputs(x, base)
    lp = [LinearParams((0.5, -0.3, 1.1), True)] * segs.count
    out = linear_merge(x, poisoned(segs.total, dtype), segs, lp)
    assert_bits_equal_nan(out, reference("linear", x, None, segs, lp, dtype), "linear")
    tp = [TaskArithmeticParams((0.5, -0.3, 1.1), True, 0.7)] * segs.count
    out = task_arithmetic_merge(x, base, poisoned(segs.total, dtype), segs, tp)
    assert_bits_equal_nan(out, reference("task_arithmetic", x, base, segs, tp, dtype), "task_arithmetic")


@pytest.mark.parametrize("method,consensus", [("dare_linear", None), ("dare_ties", "sum")])
def test_dare_nonfinite(method, consensus):
    from fastmerge.kernels.dare import dare_merge

    x, base, segs = packed(torch.bfloat16)
    poison_inputs(x, base)
    params = [DareParams((0.5, -0.3, 1.1), (0.4, 1.0, 0.25), lambda_=0.7, seed=42, key=ParamContext(f"l.{s}").key,
                         rescale=False, normalize=consensus is not None) for s in range(segs.count)]
    out = dare_merge(x, base, poisoned(segs.total, torch.bfloat16), segs, params, consensus)
    assert_bits_equal_nan(out, reference(method, x, base, segs, params, torch.bfloat16), method)


@pytest.mark.parametrize("method,consensus", [("della", "sum"), ("della_linear", None)])
def test_della_nonfinite(method, consensus):
    from fastmerge.kernels.della import della_merge

    x, base, segs = packed(torch.float32)
    poison_inputs(x, base)
    params = [DellaParams((0.5, -0.3, 1.1), (0.4, 1.0, 0.25), (0.1, 0.1, 0.2), lambda_=0.7, seed=9,
                          key=ParamContext(f"l.{s}").key, rescale=False, normalize=consensus is not None)
              for s in range(segs.count)]
    out = della_merge(x, base, poisoned(segs.total, torch.float32), segs, params, consensus)
    assert_bits_equal_nan(out, reference(method, x, base, segs, params, torch.float32), method)


def test_select_nan_and_inf_order_like_kthvalue():
    """The radix select's order: NaN above +inf above every finite |δ| (``torch.kthvalue``'s)."""
    from fastmerge.kernels.select import kth_largest

    x, base, segs = packed(torch.float32)
    poison_inputs(x, base)
    from fastmerge.kernels._common import Segments

    n = 561
    seg = Segments.packed([n])
    xs, bs = x[:, SEG2].contiguous(), base[SEG2].contiguous()
    for ks in ([1, 5], [224, 300], [301, 561]):  # two queries per model (breadcrumbs' band), as the kernel takes
        k = torch.tensor([[ks] * 3], dtype=torch.int64)
        sel = kth_largest(xs, bs, seg, k)
        for t in range(3):
            mag = (xs[t].cpu().float() - bs.cpu().float()).abs()
            for q, kk in enumerate(ks):
                want = float(torch.kthvalue(mag, n - kk + 1).values)
                got = float(sel.values[0, t, q].cpu())
                assert (math.isnan(want) and math.isnan(got)) or got == want, (t, kk, got, want)


def test_select_refuses_more_than_two_queries_per_model():
    from fastmerge.kernels.select import Selection

    with pytest.raises(ValueError, match="queries per model"):
        Selection.start(torch.ones((1, 3, 3), dtype=torch.int64), "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geometric_nonfinite(dtype):
    from fastmerge.kernels.model_stock import ModelStockKernel
    from fastmerge.kernels.slerp import SlerpKernel

    x, base, segs = packed(dtype, T=1, scale=0.3, tied=False)
    x[0, SEG2.start + 3] = float("inf")
    params = [SlerpParams(t) for t in (0.3, 0.5, 0.7, 1.2)]
    out = SlerpKernel(params, segs.numel, x.device).run(x, base, poisoned(segs.total, dtype), segs)
    assert_bits_equal_nan(out, reference("slerp", x, base, segs, params, dtype), "slerp")
    x, base, segs = packed(dtype, tied=False)
    poison_inputs(x, base)
    params = [ModelStockParams()] * segs.count
    out = ModelStockKernel(params, segs.numel, x.device).run(x, base, poisoned(segs.total, dtype), segs, block=128)
    assert_bits_equal_nan(out, reference("model_stock", x, base, segs, params, dtype), "model_stock")
