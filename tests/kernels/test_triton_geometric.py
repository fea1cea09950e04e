"""kernels/slerp.py and kernels/model_stock.py: a Gram pass + one fused combine, against the references."""

import pytest

from fastmerge.methods.model_stock import ModelStockParams
from fastmerge.methods.slerp import SlerpParams
from helpers.kernel_cases import DTYPES, assert_bits_equal, needs_triton, packed, poisoned, reference

pytestmark = needs_triton


@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp(dtype):
    from fastmerge.kernels.slerp import SlerpKernel

    x, base, segs = packed(dtype, T=1, scale=0.3, tied=False)
    x[0, 1:8] = base[1:8] * 1.0001  # the 7-element tensor: nearly collinear → plain lerp
    params = [SlerpParams(t) for t in (0.3, 0.5, 0.7, 1.2)]
    out = SlerpKernel(params, segs.numel, x.device).run(x, base, poisoned(segs.total, dtype), segs)
    assert_bits_equal(out, reference("slerp", x, base, segs, params, dtype), f"slerp {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_stock(dtype):
    from fastmerge.kernels.model_stock import ModelStockKernel

    x, base, segs = packed(dtype, tied=False)
    params = [ModelStockParams()] * segs.count
    out = ModelStockKernel(params, segs.numel, x.device).run(x, base, poisoned(segs.total, dtype), segs, block=128)
    assert_bits_equal(out, reference("model_stock", x, base, segs, params, dtype), f"model_stock {dtype}")
