"""kernels/linear.py: linear (fused multiply-add accumulation) and task_arithmetic, bit for bit."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.methods.linear import LinearParams
from fastmerge.methods.task_arithmetic import TaskArithmeticParams
from helpers.kernel_cases import DTYPES, assert_bits_equal, needs_triton, packed, poisoned, reference

pytestmark = needs_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", ["same", torch.float32])
def test_linear_and_task_arithmetic_bit_exact(dtype, out_dtype):
    from fastmerge.kernels.linear import linear_merge, task_arithmetic_merge

    odt = dtype if out_dtype == "same" else out_dtype
    x, base, segs = packed(dtype, tied=False)
    for normalize in (True, False):
        lp = [LinearParams((0.5, -0.3, 1.1), normalize)] * segs.count
        out = linear_merge(x, poisoned(segs.total, odt), segs, lp)
        assert_bits_equal(out, reference("linear", x, None, segs, lp, odt), f"linear {normalize}")
        tp = [TaskArithmeticParams((0.5, -0.3, 1.1), normalize, 0.7 + s) for s in range(segs.count)]
        out = task_arithmetic_merge(x, base, poisoned(segs.total, odt), segs, tp)
        assert_bits_equal(out, reference("task_arithmetic", x, base, segs, tp, odt), f"task_arithmetic {normalize}")


def test_linear_mergekit_compat_rounds_to_the_inputs_dtype_first():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(19, 23, generator=g).bfloat16() for _ in range(3)]
    kw = dict(weight=[0.2, 0.3, 0.6], mergekit_compat=True, out_dtype=torch.float32)
    got = merge_tensors("linear", xs, backend="triton", **kw)
    assert_bits_equal(got, merge_tensors("linear", xs, backend="torch", **kw), "linear compat")
