"""kernels/breadcrumbs.py: the two-query band selection and fused tail against methods/breadcrumbs.py."""

import pytest
import torch

from fastmerge.methods.breadcrumbs import BreadcrumbsParams
from helpers.kernel_cases import DTYPES, assert_bits_equal, check_rescale, needs_triton, packed, poisoned, reference

pytestmark = needs_triton


def _params(S, **kw):
    # model 0: a band with both bounds; model 1: density + gamma ≥ 1, no lower bound (n_bot = 0);
    # model 2: gamma 0.3 (a wide top cut); the 1-element tensor keeps nothing (target = 0)
    return [BreadcrumbsParams((0.5, -0.3, 1.1), (0.4, 0.6, 0.25), (0.01, 0.5, 0.3), lambda_=0.7, **kw) for _ in range(S)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,consensus", [("breadcrumbs", None), ("breadcrumbs_ties", "sum")])
def test_breadcrumbs_bit_exact(dtype, method, consensus):
    from fastmerge.kernels.breadcrumbs import breadcrumbs_merge

    x, base, segs = packed(dtype)
    params = _params(segs.count)
    out = breadcrumbs_merge(x, base, poisoned(segs.total, dtype), segs, params, consensus)
    assert_bits_equal(out, reference(method, x, base, segs, params, dtype), method)


def test_breadcrumbs_rescale():
    from fastmerge.kernels.breadcrumbs import BreadcrumbsKernel
    from fastmerge.methods.breadcrumbs import band_mask

    x, base, segs = packed(torch.float32)
    params = _params(segs.count, rescale=True, normalize=True)
    keep = lambda s, t, d: band_mask(d, params[s].density[t], params[s].gamma[t], "threshold")  # noqa: E731
    check_rescale(BreadcrumbsKernel(params, segs.numel, x.device, "sum"), x, base, segs, keep, "breadcrumbs_ties",
                  params, torch.float32)


def test_breadcrumbs_topk_is_refused():
    from fastmerge.kernels.breadcrumbs import BreadcrumbsKernel

    with pytest.raises(ValueError, match="topk"):
        BreadcrumbsKernel(_params(1, selection="topk"), [10], "cpu", None)
