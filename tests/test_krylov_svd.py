"""fastmerge.ops.krylov_svd: the block Krylov SVD against the exact SVD (flat noise, the hard case for a sketch;
decaying spectra; exact low rank; zero), batching, and the exact fallback."""

import pytest
import torch

from fastmerge.ops.krylov_svd import krylov_plan, krylov_svd


def _spectrum(m: int, n: int, sigma: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return (u * sigma[:r]) @ v.T


def _ratio(a: torch.Tensor, u, s, v, k: int) -> float:
    opt = torch.linalg.svdvals(a.double())[k:].square().sum().sqrt()
    return float((a.double() - ((u * s.unsqueeze(-2)) @ v.mT).double()).norm() / opt)


@pytest.mark.parametrize("kind", ["noise", "power0.5", "power1", "noise+spikes"])
def test_near_optimal_error(kind):
    g = torch.Generator().manual_seed(3)
    m, n, k = 400, 300, 24
    i = torch.arange(1, 301, dtype=torch.float32)
    if kind == "noise":  # Marchenko-Pastur: the 168M benchmark family's task vectors
        a = torch.randn(m, n, generator=g)
    elif kind == "noise+spikes":
        a = torch.randn(m, n, generator=g) * (1 + 9 * (torch.rand(m, n, generator=g) < 0.01))
    else:
        a = _spectrum(m, n, i ** -float(kind[5:]), g)
    u, s, v, how = krylov_svd(a, k)
    assert how == "krylov" and u.shape == (m, k) and s.shape == (k,) and v.shape == (n, k)
    assert _ratio(a, u, s, v, k) <= 1.02, kind
    torch.testing.assert_close(u.mT @ u, torch.eye(k), atol=1e-4, rtol=0)  # orthonormal
    assert (s[:-1] >= s[1:] * (1 - 1e-3)).all()


def test_low_rank_is_recovered_and_zero_gives_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g) @ torch.randn(3, 150, generator=g)  # rank 3 < k: the later blocks are noise
    u, s, v, how = krylov_svd(a, 12)
    assert how == "krylov"
    torch.testing.assert_close((u * s) @ v.T, a, atol=1e-4, rtol=1e-4)
    assert float(s[3:].max()) < 1e-4 * float(s[0])
    u, s, v, _ = krylov_svd(torch.zeros(200, 150), 12)
    assert torch.isfinite(u).all() and torch.equal(s, torch.zeros(12)) and torch.equal(v, torch.zeros(150, 12))


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 2, 160, 220, generator=g)
    u, s, v, _ = krylov_svd(a, 10, seed=7)
    for i in range(3):
        for j in range(2):
            u1, s1, v1, _ = krylov_svd(a[i, j], 10, seed=7)
            torch.testing.assert_close((u[i, j] * s[i, j]) @ v[i, j].T, (u1 * s1) @ v1.T, atol=1e-4, rtol=1e-4)


def test_plan_and_exact_fallback():
    assert krylov_plan(128, (1024, 2816)) == (64, 4)
    assert krylov_plan(8, (32, 32)) is None  # 5 blocks of 4 = 20 >= 16: no cheaper than the exact SVD
    assert krylov_plan(12, (256, 256), block=2, iters=4) is None  # 10 columns < k: cannot hold the rank
    a = torch.randn(32, 40)
    u, s, v, how = krylov_svd(a, 8)
    assert how == "exact"
    uu, ss, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, ss[:8])
