"""della / della_linear: rank-based keep probabilities by hand (rows, 1-D, N-D, ties, one-entry rows),
the radix ranks = a stable argsort, the mask = the generator's, keep statistics by rank, validation,
then every backend against the reference."""

import math

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method, rng
from fastmerge.methods.della import DellaParams, della_compat_probs, della_probs, rank_dtype, row_ranks, to_rows
from fastmerge.methods.ties import TiesParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

della = get_method("della").reference
linear = get_method("della_linear").reference


def params(n, weight, density, epsilon=0.15, **kw) -> DellaParams:
    as_t = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
    return DellaParams(as_t(weight), as_t(density), as_t(epsilon), **kw)


def test_defaults_follow_mergekit():
    d, dl = get_method("della").param_specs(), get_method("della_linear").param_specs()
    assert d["normalize"].default is True and dl["normalize"].default is False
    assert d["rescale"].default is True and dl["rescale"].default is True
    assert d["epsilon"].default == 0.15 and d["epsilon"].per_model and "epsilon" in dl
    assert get_method("della").consensus == "sum" and get_method("della_linear").consensus is None


def test_probabilities_by_hand():
    # |δ| = [0.1, 0.3, 0.2]: ranks [0, 2, 1], rank_norm [0, 1, 0.5]; p = 0.4 + 0.2·rank_norm
    p = della_probs(torch.tensor([0.1, -0.3, 0.2]), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([0.4, 0.6, 0.5]), atol=1e-7, rtol=0)
    # 2-D: per row
    p = della_probs(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [50.0, 40.0, 30.0, 20.0, 10.0]]), 0.5, 0.2)
    want = torch.tensor([[0.3, 0.4, 0.5, 0.6, 0.7], [0.7, 0.6, 0.5, 0.4, 0.3]])
    assert torch.allclose(p, want, atol=1e-7, rtol=0)


def test_default_probabilities_are_the_documented_fp32_formula():
    # the cross-backend contract, in numpy fp32 (each operation rounded, no fma): p = lo + span·(r / (n−1))
    import numpy as np

    delta = torch.randn(3, 1001)
    d, eps = 0.33, 0.12
    r = np.argsort(np.argsort(delta.abs().numpy(), axis=1, kind="stable"), axis=1, kind="stable").astype(np.float32)
    lo, span = np.float32(d - eps), np.float32(2 * eps)
    want = lo + span * (r / np.float32(1000))
    assert want.dtype == np.float32
    assert torch.equal(della_probs(delta, d, eps), torch.from_numpy(want))


def test_equal_magnitudes_ranked_by_index():
    assert row_ranks(torch.tensor([[1.0, 1.0, 1.0, 0.5]])).tolist() == [[1, 2, 3, 0]]
    assert row_ranks(torch.tensor([[1.0, 1.0, 1.0, 0.5]]).bfloat16()).tolist() == [[1, 2, 3, 0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_radix_ranks_equal_a_stable_argsort(dtype):
    # 16-bit magnitudes of a 0.01-scale delta repeat a lot: ties are the interesting case
    mag = (0.01 * torch.randn(37, 1001)).to(dtype).abs()
    mag[0, :10] = 0
    want = torch.argsort(torch.argsort(mag.float(), dim=1, stable=True), dim=1)
    assert torch.equal(row_ranks(mag).long(), want)
    assert (mag[:, :, None] == mag[:, None, :10]).sum() > 37 * 10  # there were ties to break


def test_16_bit_inputs_rank_magnitudes_rounded_to_their_dtype():
    # base 1, x = [2^-10, 2^-9] (bf16): fp32 |δ| = [0.9990234375, 0.998046875] ranks [1, 0]; rounded to
    # bf16 (spacing 2^-8 below 1) both are 1.0 (the second is a halfway case, to even), so they tie and
    # rank by index, [0, 1] -- what mergekit ranks, its δ being computed in bf16
    b = torch.ones(2, dtype=torch.bfloat16)
    x = torch.tensor([2.0**-10, 2.0**-9], dtype=torch.bfloat16)
    delta = x.float() - b.float()
    assert delta.abs().tolist() == [0.9990234375, 0.998046875]
    assert rank_dtype(x, b) == torch.bfloat16 and rank_dtype(x, b.float()) == torch.float32
    assert rank_dtype(x.float(), b.float()) == torch.float32 and rank_dtype(x.half(), b.half()) == torch.float16
    assert della_probs(delta, 0.5, 0.1).tolist() == pytest.approx([0.6, 0.4])
    assert della_probs(delta, 0.5, 0.1, torch.bfloat16).tolist() == pytest.approx([0.4, 0.6])
    # and the method uses it: seed 30 draws u = [0.467, 0.572], inside [0.4, 0.6) for both entries, so
    # the bf16 key (p = [0.4, 0.6]) keeps [False, True] where the fp32 key (p = [0.6, 0.4]) would keep [True, False]
    assert rng.uniform(30, 9, 0, 2).tolist() == pytest.approx([0.467, 0.572], abs=1e-3)
    out = linear([x], b, params(1, 1.0, 0.5, 0.1, normalize=False, rescale=False, seed=30, key=9))
    assert torch.equal(out, b.float() + torch.where(torch.tensor([False, True]), delta, 0.0))


def test_nd_tensors_rank_along_dim_1_and_1d_is_one_row():
    t = torch.randn(2, 5, 3)
    rows = t.transpose(1, 2).reshape(-1, 5)  # each (i, :, k) fibre
    want = della_probs(rows, 0.5, 0.1).reshape(2, 3, 5).transpose(1, 2)
    assert torch.equal(della_probs(t, 0.5, 0.1), want)
    assert torch.equal(to_rows(torch.arange(4.0)), torch.arange(4.0).reshape(1, 4))
    assert torch.equal(della_probs(torch.arange(4.0), 0.5, 0.1), della_probs(torch.arange(4.0)[None], 0.5, 0.1)[0])


def test_one_entry_rows_get_density():
    # mergekit: rank_norm = 0/0 = NaN and torch.bernoulli raises; fastmerge: rank_norm 1/2, p = density
    assert torch.allclose(della_probs(torch.randn(5, 1), 0.4, 0.1), torch.full((5, 1), 0.4))
    assert torch.allclose(della_probs(torch.randn(1), 0.4, 0.1), torch.full((1,), 0.4))
    assert torch.allclose(della_compat_probs(torch.randn(5, 1), 0.4, 0.1), torch.full((5, 1), 0.4))


def test_mask_is_u_below_p():
    b = torch.randn(40, 70)
    x = b + torch.randn(40, 70)
    delta = x - b
    probs = della_probs(delta, 0.5, 0.15)
    keep = rng.keep_mask(3, 17, 0, probs, delta.shape)
    out = linear([x], b, params(1, 0.7, 0.5, normalize=False, rescale=False, seed=3, key=17))
    assert torch.equal(out, b + torch.where(keep, 0.7 * delta, 0.0))
    # rescale: the L1 norm is preserved
    out = linear([x], b, params(1, 1.0, 0.5, seed=3, key=17))
    assert torch.allclose((out - b).abs().sum(), delta.abs().sum(), rtol=1e-5)


def test_larger_magnitudes_kept_more_often_within_5_sigma():
    # one row of 2^16: keeps in a rank band ~ Poisson-binomial, mean Σp, sd sqrt(Σp(1-p))
    n = 1 << 16
    delta = torch.randn(n)
    probs = della_probs(delta, 0.5, 0.3)
    keep = rng.keep_mask(1, 2, 0, probs, n)
    ranks = row_ranks(delta.abs()[None])[0]
    for lo, hi in ((0, n // 4), (3 * n // 4, n)):
        band = (ranks >= lo) & (ranks < hi)
        mean, sd = float(probs[band].sum()), math.sqrt(float((probs[band] * (1 - probs[band])).sum()))
        assert abs(int(keep[band].sum()) - mean) <= 5 * sd
    bottom, top = keep[ranks < n // 4].float().mean(), keep[ranks >= 3 * n // 4].float().mean()
    assert 0.2 < bottom < 0.3 < 0.7 < top < 0.8  # p ranges 0.2..0.35 and 0.65..0.8 there


def test_density_one_della_is_ties_without_trim():
    b = torch.randn(300)
    xs = [b + 0.1 * torch.randn(300) for _ in range(3)]
    w = (0.3, 0.5, 0.9)
    want = get_method("ties").reference(xs, b, TiesParams(w, (1.0,) * 3))
    assert_bitwise_equal(della(xs, b, params(3, w, 1.0)), want, "della d=1")


def test_compat_probabilities_in_bf16():
    # mergekit converts the ranks to bf16 before + 1: in a 1002-entry row the ranks above 256 collapse
    # onto bf16 values (8 significant bits), and p itself is a bf16 number
    delta = torch.randn(1, 1002).bfloat16()
    p = della_compat_probs(delta, 0.5, 0.15)
    assert p.dtype == torch.bfloat16
    assert p.unique().numel() < 500
    assert float(p.min()) == pytest.approx(0.35, abs=2**-9) and float(p.max()) == pytest.approx(0.65, abs=2**-9)
    # in fp32 the compat probabilities equal the default ones to 1 fp32 ulp (different operation order)
    d32 = torch.randn(8, 300)
    assert torch.allclose(della_compat_probs(d32, 0.5, 0.15), della_probs(d32, 0.5, 0.15), atol=2**-23, rtol=0)


@pytest.mark.parametrize("density,epsilon", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5), (0.0, 0.1)])
def test_density_epsilon_validated(density, epsilon):
    with pytest.raises(ConfigError, match="density"):
        merge_tensors("della", [torch.randn(4)], torch.randn(4), weight=1.0, density=density, epsilon=epsilon)


def test_density_one_needs_no_epsilon_check():
    """density 1 keeps every entry whatever epsilon (no drop, so density ± epsilon is not checked): one
    model at weight 1 gives base + (x - base) exactly. Were epsilon applied, p would span [0.5, 1.5] and
    about a quarter of the 256 entries would fall back to the base."""
    x, b = torch.randn(256), torch.randn(256)
    for method in ("della", "della_linear"):
        got = merge_tensors(method, [x], b, weight=1.0, density=1.0, epsilon=0.5)
        assert torch.equal(got, b + (x - b)), method
    with pytest.raises(ConfigError, match="density ± epsilon"):  # below 1 the same epsilon is refused
        merge_tensors("della", [x], b, weight=1.0, density=0.9, epsilon=0.5)


def _runs(backend: str, method: str, compat: bool) -> None:
    from fastmerge.methods.base import ParamContext

    p = params(3, [0.3, 0.5, 0.4], [0.5, 0.3, 1.0], [0.15, 0.1, 0.15], normalize=method == "della", seed=5,
               key=ParamContext("m.w").key)
    skip_unless_runs(backend, get_method(method), p, compat)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (3, 17, 5), (2**14 + 3,)])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, method, dtype, shape, compat):
    _runs(backend, method, compat)
    b = torch.randn(shape).to(dtype)
    xs = [(b.float() + 0.05 * torch.randn(shape)).to(dtype) for _ in range(3)]
    w, d, e = [0.3, 0.5, 0.4], [0.5, 0.3, 1.0], [0.15, 0.1, 0.15]
    got = merge_tensors(method, xs, b, backend=backend, mergekit_compat=compat, seed=5, tensor_name="m.w",
                        weight=w, density=d, epsilon=e)
    from fastmerge.methods.base import ParamContext

    p = params(3, w, d, e, normalize=method == "della", seed=5, key=ParamContext("m.w").key)
    assert_bitwise_equal(got, get_method(method).reference(xs, b, p, compat=compat).to(dtype), f"{method} {backend}")
