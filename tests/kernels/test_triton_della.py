"""kernels/della.py: DELLA's rank-dependent masks and fused tail against methods/della.py's reference."""

import pytest
import torch

from fastmerge.methods.base import ParamContext
from fastmerge.methods.della import DellaParams
from helpers.kernel_cases import assert_bits_equal, assert_close_ulps, check_rescale, needs_triton, packed, poisoned, reference

pytestmark = needs_triton


def _params(S, **kw):
    return [
        DellaParams((0.5, -0.3, 1.1), (0.4, 1.0, 0.25), (0.1, 0.1, 0.2), lambda_=0.7, seed=9,
                    key=ParamContext(f"layers.{s}.w").key, **kw)
        for s in range(S)
    ]


@pytest.mark.parametrize("method,consensus", [("della", "sum"), ("della_linear", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_della_bit_exact_without_rescale(method, consensus, dtype):
    from fastmerge.kernels.della import della_merge

    x, base, segs = packed(dtype)
    params = _params(segs.count, rescale=False, normalize=consensus is not None)
    out = della_merge(x, base, poisoned(segs.total, dtype), segs, params, consensus)
    assert_bits_equal(out, reference(method, x, base, segs, params, dtype), method)


def test_della_rescale():
    from fastmerge.kernels.della import DellaKernel
    from fastmerge.methods.della import della_keep

    x, base, segs = packed(torch.float32)
    params = _params(segs.count)
    keep = lambda s, t, d: della_keep(d, params[s].density[t], params[s].epsilon[t], 9, params[s].key, t)  # noqa: E731
    check_rescale(DellaKernel(params, segs.shapes, x.device, "sum"), x, base, segs, keep, "della", params, torch.float32)


def test_della_rescale_bf16_end_to_end():
    from fastmerge.kernels.della import della_merge

    x, base, segs = packed(torch.bfloat16)
    params = _params(segs.count)
    out = della_merge(x, base, poisoned(segs.total, torch.bfloat16), segs, params, "sum")
    assert_close_ulps(out, reference("della", x, base, segs, params, torch.bfloat16), 1, 0.99, "della rescale")
