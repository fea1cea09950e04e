"""The expected node M-Loss under the paper's model (Section 4): closed forms vs exact quadrature vs Monte Carlo."""

import math

import pytest

from fastmerge.errors import ConfigError
from fastmerge.mloss.expected import (
    GELU_CURVATURE, expected_mloss, expected_mloss_numeric, monte_carlo_mloss, paper_expected_mloss,
)

N_MC = 1_000_000  # ~0.5 s per draw on the loaded 2-core machine; standard errors ≈ 0.5% of the mean


def test_gelu_curvature_constant():
    # ∫|φ(t)(2 − t²)| dt by brute force on a fine grid
    n, lo, hi = 400_001, -12.0, 12.0
    h = (hi - lo) / (n - 1)
    s = 0.0
    for i in range(n):
        t = lo + i * h
        s += abs(math.exp(-t * t / 2) / math.sqrt(2 * math.pi) * (2 - t * t))
    assert GELU_CURVATURE == pytest.approx(s * h, rel=1e-6)
    assert GELU_CURVATURE == pytest.approx(1.5156, abs=1e-4)


@pytest.mark.parametrize("act,k,sigma", [("relu", 8.0, 0.5), ("leaky_relu(0.2)", 4.0, 0.2), ("gelu", 6.0, 0.2)])
def test_closed_form_matches_monte_carlo(act, k, sigma):
    mean, se = monte_carlo_mloss(act, k, sigma, N_MC, seed=1)
    want = expected_mloss(act, k, sigma)
    # GELU's closed form is the second-order term: at σ = 0.2 the next order is ~0.6% (quadrature below)
    assert abs(mean - want) < 4 * se + (0.01 * want if act == "gelu" else 0)
    # the exact quadrature of the same model agrees with Monte Carlo too (any σ)
    assert abs(mean - expected_mloss_numeric(act, k, sigma)) < 4 * se


def test_relu_closed_form_is_exact_for_k_much_larger_than_sigma():
    # a coarser grid than the default (8001 × 801) keeps this at ~2 s; its error is ≤ 1.2e-4 here
    grid = dict(m_points=4001, d_points=401)
    for k, sigma in [(8.0, 0.5), (20.0, 1.0), (3.0, 0.1)]:
        assert expected_mloss_numeric("relu", k, sigma, **grid) == pytest.approx(sigma**2 / (8 * k), rel=2e-4)
    assert expected_mloss_numeric("leaky_relu(0.3)", 8.0, 0.5, **grid) == pytest.approx(0.7 * 0.25 / 64, rel=2e-4)


def test_gelu_needs_small_sigma_and_scales_as_sigma_squared_over_k():
    k = 8.0
    small = expected_mloss_numeric("gelu", k, 0.05)
    assert small == pytest.approx(expected_mloss("gelu", k, 0.05), rel=1e-3)
    assert expected_mloss_numeric("gelu", 2 * k, 0.05) == pytest.approx(small / 2, rel=1e-3)
    big = expected_mloss_numeric("gelu", k, 1.0)
    assert big < expected_mloss("gelu", k, 1.0)  # curvature averaged over σ: below the second-order term


def test_paper_printed_constants_do_not_match_its_model():
    # The paper prints σ²/(√(2π)k) for ReLU and σ²/(4k) for GELU; Monte Carlo of its own model gives
    # σ²/(8k) and 0.1895σ²/k: the printed ReLU constant is 8/√(2π) ≈ 3.19× too large.
    k, sigma = 8.0, 0.5
    mean, se = monte_carlo_mloss("relu", k, sigma, N_MC, seed=2)
    assert paper_expected_mloss("relu", k, sigma) / mean == pytest.approx(8 / math.sqrt(2 * math.pi), rel=0.02)
    assert abs(paper_expected_mloss("relu", k, sigma) - mean) > 100 * se
    assert paper_expected_mloss("gelu", k, sigma) == sigma**2 / (4 * k)


def test_identity_and_errors():
    assert expected_mloss("identity", 5.0, 1.0) == 0.0
    assert expected_mloss_numeric("silu", 5.0, 0.0) == 0.0
    with pytest.raises(ConfigError, match="closed form"):
        expected_mloss("silu", 5.0, 0.3)
    with pytest.raises(ConfigError, match="k > 0"):
        expected_mloss("relu", 0.0, 0.3)
