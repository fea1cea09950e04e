"""breadcrumbs / breadcrumbs_ties: the magnitude band by hand (0.1.5's rule, not 0.1.4's), threshold vs
exact selection with ties, compat's sort order, validation, then every backend against the reference."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.breadcrumbs import BreadcrumbsParams, band, band_compat, band_mask
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

plain = get_method("breadcrumbs").reference
ties = get_method("breadcrumbs_ties").reference


def params(n, weight, density, gamma=0.01, **kw) -> BreadcrumbsParams:
    as_t = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
    return BreadcrumbsParams(as_t(weight), as_t(density), as_t(gamma), **kw)


def test_defaults_follow_mergekit():
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        specs = get_method(name).param_specs()
        assert specs["gamma"].default == 0.01 and specs["gamma"].per_model
        assert specs["normalize"].default is False and specs["rescale"].default is False
    assert get_method("breadcrumbs").consensus is None and get_method("breadcrumbs_ties").consensus == "sum"


def test_band_counts_by_hand():
    # N=100, d=0.5, γ=0.1: target 50, n_top 10, n_bot 100-50-10 = 40
    assert band(100, 0.5, 0.1) == (40, 50)
    # target + n_top > N: the outlier cut shrinks (n_bot = 0)
    assert band(10, 0.9, 0.2) == (0, 9)
    # int() truncation, no minimum of 1: 0.05·10 = 0.5 -> target 0, nothing kept (n_bot = 10 - 0 - 0)
    assert band(10, 0.05, 0.0) == (10, 0)


def test_band_keeps_the_middle_magnitudes_by_hand():
    # |δ| = 1..10 (shuffled, signed); d=0.5, γ=0.2: target 5, n_top 2, n_bot 3 -> keep |δ| in {4,...,8}
    d = torch.tensor([-3.0, 9.0, 1.0, -8.0, 5.0, 10.0, -2.0, 4.0, 7.0, -6.0])
    keep = band_mask(d, 0.5, 0.2, "threshold")
    assert sorted(d[keep].abs().tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert torch.equal(band_mask(d, 0.5, 0.2, "topk"), keep)
    out = plain([d], torch.zeros(10), params(1, 2.0, 0.5, 0.2))
    assert torch.equal(out, torch.where(keep, 2 * d, 0.0))


def test_gamma_zero_and_tiny_tensors_keep_density_not_nothing():
    # 0.1.4 kept indices[n_bot:-n_top], i.e. nothing when n_top = 0; 0.1.5 (and fastmerge) keep target
    d = torch.randn(64)
    for gamma in (0.0, 0.01, 0.1):
        assert band_mask(d, 0.5, gamma, "threshold").sum() == 32
        assert (band_compat(d, 0.5, gamma, False) != 0).sum() == 32
    # γ = 0: the top half by magnitude
    top = d.abs() >= d.abs().kthvalue(33).values
    assert torch.equal(band_mask(d, 0.5, 0.0, "threshold"), top)


def test_target_zero_keeps_nothing_and_density_one_keeps_everything():
    b = torch.randn(10)
    x = b + torch.randn(10)
    assert torch.equal(plain([x], b, params(1, 1.0, 0.05, 0.0)), b)  # int(0.5) = 0 kept
    # density 1: δ untouched, outliers included (mergekit returns the tensor before any cut)
    assert band_mask(x - b, 1.0, 0.5, "threshold") is None
    assert torch.equal(plain([x], b, params(1, 1.0, 1.0, 0.5)), b + (x - b))


def test_threshold_keeps_boundary_ties_topk_keeps_exactly_target_in_index_order():
    # ascending |δ|: 1, 2, 2, 2, 3, 3, 3, 5 ; N=8, d=0.5, γ=0.25: target 4, n_top 2, n_bot 2
    # exact ranks 2..5 = (2 @ idx 3), (2 @ idx 5), (3 @ idx 0), (3 @ idx 2)  [ties by index order]
    d = torch.tensor([3.0, 2.0, -3.0, 2.0, 1.0, -2.0, 3.0, 5.0])
    thr = band_mask(d, 0.5, 0.25, "threshold")
    assert thr.tolist() == [True, True, True, True, False, True, True, False]  # every 2 and 3
    exact = band_mask(d, 0.5, 0.25, "topk")
    assert exact.tolist() == [True, False, True, True, False, True, False, False]
    assert int(exact.sum()) == 4


def test_topk_with_both_boundaries_equal():
    d = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # d=0.5, γ=0.2: target 3, n_top 1, n_bot 2
    assert band_mask(d, 0.5, 0.2, "topk").tolist() == [False, False, True, True, True, False]


def test_compat_uses_the_sort_order_and_compute_dtype():
    delta = (0.01 * torch.randn(3000)).bfloat16()
    got = band_compat(delta, 0.4, 0.05, True)
    n_bot, target = band(3000, 0.4, 0.05)
    order = torch.sort(delta.abs().float()).indices
    mask = torch.zeros(3000, dtype=torch.bfloat16)
    mask[order[n_bot:n_bot + target]] = 1
    masked = delta * mask
    assert torch.equal(got, masked * (delta.abs().sum() / masked.abs().sum()))
    # without ties (fp32 random), the sort order and the default selection agree
    d32 = torch.randn(3000)
    assert torch.equal(band_compat(d32, 0.4, 0.05, False) != 0, band_mask(d32, 0.4, 0.05, "topk"))


def test_breadcrumbs_ties_consensus_by_hand():
    # density 1: no cut; wδ columns [1,-1,2] -> +: 3; [-2,-1,3] sum 0 -> +: 3; [3,2,-5] sum 0 -> +: 5; [.5,4,1]: 5.5
    X = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, -1.0, 2.0, 4.0]), torch.tensor([2.0, 3.0, -5.0, 1.0])]
    assert torch.equal(ties(X, torch.zeros(4), params(3, 1.0, 1.0)), torch.tensor([3.0, 3.0, 5.0, 5.5]))
    assert torch.equal(plain(X, torch.zeros(4), params(3, 1.0, 1.0)), torch.tensor([2.0, 0.0, 0.0, 5.5]))


def test_rescale_preserves_l1():
    b = torch.randn(500)
    x = b + torch.randn(500)
    out = plain([x], b, params(1, 1.0, 0.3, 0.1, rescale=True))
    assert torch.allclose((out - b).abs().sum(), (x - b).abs().sum(), rtol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(density=0.5, gamma=-0.1), "gamma"), (dict(density=0.5, gamma=1.5), "gamma"),
])
def test_parameters_validated(kw, match):
    with pytest.raises(ConfigError, match=match):
        merge_tensors("breadcrumbs", [torch.randn(4)], torch.randn(4), weight=1.0, **kw)


def _runs(backend: str, method: str, selection: str, compat: bool) -> None:
    p = params(3, [0.3, 0.5, 0.4], [0.5, 0.3, 1.0], [0.01, 0.1, 0.0], selection=selection, rescale=True, lambda_=1.1)
    skip_unless_runs(backend, get_method(method), p, compat)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (2**14 + 3,)])
@pytest.mark.parametrize("selection,compat", [("threshold", False), ("topk", False), ("threshold", True)])
def test_backend_matches_reference(backend, method, dtype, shape, selection, compat):
    _runs(backend, method, selection, compat)
    b = torch.randn(shape).to(dtype)
    xs = [(b.float() + 0.05 * torch.randn(shape)).to(dtype) for _ in range(3)]
    w, d, g = [0.3, 0.5, 0.4], [0.5, 0.3, 1.0], [0.01, 0.1, 0.0]
    got = merge_tensors(method, xs, b, backend=backend, mergekit_compat=compat, weight=w, density=d, gamma=g,
                        selection=selection, rescale=True, **{"lambda": 1.1})
    p = params(3, w, d, g, selection=selection, rescale=True, lambda_=1.1)
    assert_bitwise_equal(got, get_method(method).reference(xs, b, p, compat=compat).to(dtype), f"{method} {backend}")
