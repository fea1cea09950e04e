"""The expected node-level M-Loss under the paper's model (Section 4), in closed form and numerically.

Model: x ~ U(−k, k) (a pre-activation of the pretrained model), a, b ~ N(x, σ²) independent (the two
fine-tuned models' pre-activations), and

    E[D] = E | f((a+b)/2) − (f(a) + f(b))/2 |.

Derivation (ours; the paper's appendix is not part of the text we have). Write m = (a+b)/2 and
d = (a−b)/2: m | x ~ N(x, σ²/2) and d ~ N(0, σ²/2) are independent, and D = f(m) − (f(m+d) + f(m−d))/2.
Averaging x uniformly over (−k, k) smears m into density w(m) = [Φ((k−m)/s) − Φ((−k−m)/s)]/(2k),
s = σ/√2, so, exactly,

    E[D] = ∫ w(m) · E_d |f(m) − (f(m+d) + f(m−d))/2| dm.                                   (*)

When k ≫ σ (and k ≫ the width of f's curved region) w ≈ 1/(2k) wherever D ≠ 0, and:

- ReLU: t⁺ = (t + |t|)/2 gives D = −(|m+d| + |m−d| − 2|m|)/4, a triangle in m of base and height 2|d|:
  ∫ |D| dm = d²/2, and E[d²] = σ²/2, so  E[D_ReLU] = σ²/(8k).
- Leaky ReLU with slope α: f(t) = α·t + (1−α)·t⁺, the linear part cancels:  E[D] = (1−α)·σ²/(8k).
- GELU f(t) = t·Φ(t) is smooth: for σ ≪ 1, D ≈ −f''(m)·d²/2, so E[D] ≈ (σ²/(8k))·∫|f''|, and with
  f'' = φ(t)(2 − t²) (sign changes at ±√2), ∫|f''| = 1 + 4/(e·√π) − 4·Φ(−√2) ≈ 1.5156:
  E[D_GELU] ≈ 1.5156·σ²/(8k) ≈ 0.1895·σ²/k.

The paper prints σ²/(√(2π)·k) (ReLU), (1−α)σ²/(√(2π)·k) (leaky ReLU) and σ²/(4k) (GELU). Its scaling in σ
and k agrees with ours, but Monte Carlo of its own model (``monte_carlo_mloss``, tests/mloss/test_expected.py)
matches σ²/(8k) and 0.1895·σ²/k, not the printed constants (0.399 and 0.25 in place of 0.125 and 0.1895).
``paper_expected_mloss`` returns the printed forms for comparison.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .reference import activation as parse_activation

#: ∫|GELU''(t)| dt = 1 + 4/(e·√π) − 4·Φ(−√2)
GELU_CURVATURE = 1.0 + 4.0 / (math.e * math.sqrt(math.pi)) - 4.0 * 0.5 * math.erfc(1.0)


def _check(k: float, sigma: float) -> None:
    if not (k > 0 and sigma >= 0):
        raise ConfigError(f"expected M-Loss: need k > 0 and sigma >= 0, got k={k}, sigma={sigma}")


def expected_mloss(act: str, k: float, sigma: float) -> float:
    """Closed-form E[D] for ``act`` in "relu", "leaky_relu(α)", "gelu" under the paper's model, k ≫ σ
    (GELU also σ ≪ 1: the second-order term). See the module docstring for the derivation."""
    _check(k, sigma)
    a = parse_activation(act)
    if a.name == "relu":
        return sigma**2 / (8 * k)
    if a.name == "leaky_relu":
        return (1 - a.slope) * sigma**2 / (8 * k)
    if a.name == "gelu":
        return GELU_CURVATURE * sigma**2 / (8 * k)
    if a.name == "identity":
        return 0.0
    raise ConfigError(f"expected_mloss: closed form only for relu, leaky_relu, gelu (and identity), got {act!r}")


def paper_expected_mloss(act: str, k: float, sigma: float) -> float:
    """The constants as printed in the paper (Section 4): ReLU σ²/(√(2π)k), leaky (1−α)σ²/(√(2π)k), GELU σ²/(4k)."""
    _check(k, sigma)
    a = parse_activation(act)
    if a.name == "relu":
        return sigma**2 / (math.sqrt(2 * math.pi) * k)
    if a.name == "leaky_relu":
        return (1 - a.slope) * sigma**2 / (math.sqrt(2 * math.pi) * k)
    if a.name == "gelu":
        return sigma**2 / (4 * k)
    raise ConfigError(f"paper_expected_mloss: the paper gives relu, leaky_relu and gelu only, got {act!r}")


def expected_mloss_numeric(act: str, k: float, sigma: float, m_points: int = 8001, d_points: int = 801) -> float:
    """E[D] by quadrature of (*) in the module docstring: exact for any k and σ up to the grid error
    (trapezoid in m over [−k − 10s, k + 10s] and in d over ±10s, s = σ/√2; fp64). Any activation."""
    _check(k, sigma)
    if sigma == 0:
        return 0.0
    a = parse_activation(act)
    s = sigma / math.sqrt(2)
    dt = torch.float64
    d = torch.linspace(-10 * s, 10 * s, d_points, dtype=dt)
    pd = torch.exp(-0.5 * (d / s) ** 2) / (s * math.sqrt(2 * math.pi))
    wd = torch.full_like(d, float(d[1] - d[0]))
    wd[0] = wd[-1] = wd[0] / 2
    wd = wd * pd
    lo, hi = -k - 10 * s, k + 10 * s
    total = 0.0
    # chunks of m keep the m×d grid at ~8 MB
    m_all = torch.linspace(lo, hi, m_points, dtype=dt)
    hm = float(m_all[1] - m_all[0])
    sq2 = math.sqrt(2)
    for i in range(0, m_points, 1000):
        m = m_all[i:i + 1000]
        w = 0.5 * (torch.erf((k - m) / (s * sq2)) - torch.erf((-k - m) / (s * sq2))) / (2 * k)
        mm, dd = m[:, None], d[None, :]
        g = (a(mm) - 0.5 * (a(mm + dd) + a(mm - dd))).abs()
        inner = (g * wd[None, :]).sum(1)
        tw = torch.full_like(m, hm)
        if i == 0:
            tw[0] /= 2
        if i + 1000 >= m_points:
            tw[-1] /= 2
        total += float((w * inner * tw).sum())
    return total


def monte_carlo_mloss(act: str, k: float, sigma: float, n: int = 1_000_000, seed: int = 0) -> tuple[float, float]:
    """(mean, standard error) of |f((a+b)/2) − (f(a)+f(b))/2| over n draws of the paper's model (fp64)."""
    _check(k, sigma)
    a_ = parse_activation(act)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * k
    a = x + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    b = x + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    dv = (a_((a + b) / 2) - (a_(a) + a_(b)) / 2).abs()
    return float(dv.mean()), float(dv.std() / math.sqrt(n))
