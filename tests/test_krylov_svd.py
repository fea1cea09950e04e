"""fastmerge.ops.krylov_svd: the block Krylov SVD against the exact SVD (flat noise, the hard case for a sketch;
decaying spectra; exact low rank; zero), batching, the exact fallback and non-finite members, on both array
libraries: torch tensors and numpy arrays (the numpy path orthonormalizes by Cholesky QR and imports no torch)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import fastmerge.ops.krylov_svd as ks
from fastmerge.ops.krylov_svd import krylov_plan, krylov_svd

LIBS = ["torch", "numpy"]


def _as(lib: str, a: torch.Tensor):
    return a.numpy() if lib == "numpy" else a


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _spectrum(m: int, n: int, sigma: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return (u * sigma[:r]) @ v.T


def _ratio(a: torch.Tensor, u, s, v, k: int) -> float:
    u, s, v = _t(u), _t(s), _t(v)
    opt = torch.linalg.svdvals(a.double())[k:].square().sum().sqrt()
    return float((a.double() - ((u * s.unsqueeze(-2)) @ v.mT).double()).norm() / opt)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["noise", "power0.5", "power1", "noise+spikes"])
def test_near_optimal_error(kind, lib):
    g = torch.Generator().manual_seed(3)
    m, n, k = 400, 300, 24
    i = torch.arange(1, 301, dtype=torch.float32)
    if kind == "noise":  # Marchenko-Pastur: the 168M benchmark family's task vectors
        a = torch.randn(m, n, generator=g)
    elif kind == "noise+spikes":
        a = torch.randn(m, n, generator=g) * (1 + 9 * (torch.rand(m, n, generator=g) < 0.01))
    else:
        a = _spectrum(m, n, i ** -float(kind[5:]), g)
    u, s, v, how = krylov_svd(_as(lib, a), k)
    assert type(u) is type(_as(lib, a)) and how == "krylov" and u.shape == (m, k) and s.shape == (k,) and v.shape == (n, k)
    assert _ratio(a, u, s, v, k) <= 1.02, kind
    u, s = _t(u), _t(s)
    torch.testing.assert_close(u.mT @ u, torch.eye(k), atol=1e-4, rtol=0)  # orthonormal
    assert (s[:-1] >= s[1:] * (1 - 1e-3)).all()


@pytest.mark.parametrize("lib", LIBS)
def test_low_rank_is_recovered_and_zero_gives_zero(lib):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g) @ torch.randn(3, 150, generator=g)  # rank 3 < k: the later blocks are noise
    u, s, v, how = krylov_svd(_as(lib, a), 12)
    u, s, v = _t(u), _t(s), _t(v)
    assert how == "krylov"
    torch.testing.assert_close((u * s) @ v.T, a, atol=1e-4, rtol=1e-4)
    assert float(s[3:].max()) < 1e-4 * float(s[0])
    u, s, v, _ = krylov_svd(_as(lib, torch.zeros(200, 150)), 12)
    u, s, v = _t(u), _t(s), _t(v)
    assert torch.isfinite(u).all() and torch.equal(s, torch.zeros(12)) and torch.equal(v, torch.zeros(150, 12))


@pytest.mark.parametrize("lib", LIBS)
def test_batched_equals_one_by_one(lib):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 2, 160, 220, generator=g)
    u, s, v, _ = krylov_svd(_as(lib, a), 10, seed=7)
    u, s, v = _t(u), _t(s), _t(v)
    for i in range(3):
        for j in range(2):
            u1, s1, v1, _ = krylov_svd(_as(lib, a[i, j]), 10, seed=7)
            u1, s1, v1 = _t(u1), _t(s1), _t(v1)
            torch.testing.assert_close((u[i, j] * s[i, j]) @ v[i, j].T, (u1 * s1) @ v1.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lib", LIBS)
def test_plan_and_exact_fallback(lib):
    assert krylov_plan(128, (1024, 2816)) == (64, 4)
    assert krylov_plan(8, (32, 32)) is None  # 5 blocks of 4 = 20 >= 16: no cheaper than the exact SVD
    assert krylov_plan(12, (256, 256), block=2, iters=4) is None  # 10 columns < k: cannot hold the rank
    a = torch.randn(32, 40)
    u, s, v, how = krylov_svd(_as(lib, a), 8)
    assert how == "exact"
    uu, ss, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(_t(s), ss[:8])


@pytest.mark.parametrize("shape", [(257, 131), (131, 257), (1000, 97)])
@pytest.mark.parametrize("k", [1, 7, 16])
def test_numpy_and_torch_agree_with_the_exact_svd_on_odd_shapes(shape, k):
    """Odd shapes and ranks: both libraries within 1.02x of the optimal error; the leading half of the singular
    values within 1 % of the exact SVD's (the tail's Ritz values converge last) and none above them."""
    g = torch.Generator().manual_seed(sum(shape) + k)
    m, n = shape
    a = _spectrum(m, n, torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.7, g) + 1e-3 * torch.randn(m, n, generator=g)
    exact = torch.linalg.svdvals(a)[:k]
    for lib in LIBS:
        u, s, v, how = krylov_svd(_as(lib, a), k, seed=5)
        assert how == "krylov" and _t(u).shape == (m, k) and _t(v).shape == (n, k), (lib, how)
        assert _ratio(a, u, s, v, k) <= 1.02, lib
        s, top = _t(s), (k + 1) // 2
        assert (s <= exact * (1 + 1e-4)).all(), lib  # Ritz values never exceed the singular values they estimate
        torch.testing.assert_close(s[:top], exact[:top], rtol=1e-2, atol=0)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shape", [(300, 200), (24, 30)])  # Krylov; exact fallback
def test_a_non_finite_member_gets_nan_factors_and_leaves_the_others(lib, bad, shape):
    g = torch.Generator().manual_seed(2)
    a = torch.randn((3,) + shape, generator=g)
    a[1, 5, 7] = bad
    u, s, v, how = krylov_svd(_as(lib, a), 8, seed=3)
    u, s, v = _t(u), _t(s), _t(v)
    assert how == ("krylov" if shape[0] > 100 else "exact")
    assert u[1].isnan().all() and s[1].isnan().all() and v[1].isnan().all()
    for i in (0, 2):  # as if factored alone
        u1, s1, v1, _ = krylov_svd(_as(lib, a[i].clone()), 8, seed=3)
        torch.testing.assert_close((u[i] * s[i]) @ v[i].T, (_t(u1) * _t(s1)) @ _t(v1).T, atol=1e-4, rtol=1e-4)


def test_numpy_cholesky_qr_is_orthonormal_and_falls_back_when_ill_conditioned(monkeypatch):
    """CholQR2 on a well-conditioned block; an ill-conditioned one (condition 1e5) and a rank-deficient one
    take Householder's QR (counted), and every Q is orthonormal with Q·R = y."""
    ops = ks._NumpyOps()
    rng = np.random.default_rng(0)
    calls = []
    real = np.linalg.qr
    monkeypatch.setattr(np.linalg, "qr", lambda y, mode="reduced": calls.append(y.shape) or real(y, mode=mode))
    good = rng.standard_normal((2, 500, 40)).astype(np.float32)
    ill = good * np.logspace(0, -5, 40, dtype=np.float32)
    deficient = good.copy()
    deficient[:, :, 5] = deficient[:, :, 3]
    for y, householder in ((good, False), (ill, True), (deficient, True)):
        calls.clear()
        q, r = ops.qr(y)
        assert bool(calls) == householder
        np.testing.assert_allclose(q.swapaxes(-1, -2) @ q, np.broadcast_to(np.eye(40), (2, 40, 40)), atol=2e-5)
        np.testing.assert_allclose(q @ r, y, atol=2e-5 * float(np.abs(y).max()))
    b = ops.basis(good)  # one pass: a basis of the same span, orthonormal to ~u·κ²
    np.testing.assert_allclose(b.swapaxes(-1, -2) @ b, np.broadcast_to(np.eye(40), (2, 40, 40)), atol=1e-4)


def test_numpy_path_imports_no_torch(tmp_path):
    code = ("import sys, numpy as np\n"
            "from fastmerge.ops.krylov_svd import krylov_svd\n"
            "a = np.random.default_rng(0).standard_normal((2, 300, 200)).astype(np.float32)\n"
            "u, s, v, how = krylov_svd(a, 12)\n"
            "small = krylov_svd(a[:, :20, :30], 8)\n"
            "assert how == 'krylov' and small[3] == 'exact' and isinstance(u, np.ndarray)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("lib", LIBS)
def test_work_buffers_poisoned_with_nan_are_fully_written(lib, monkeypatch):
    """Q and W are allocated uninitialized and filled block by block: NaN-poisoned, a block left unwritten
    would show in the factors."""
    cls = ks._NumpyOps if lib == "numpy" else ks._TorchOps
    monkeypatch.setattr(cls, "empty", lambda self, shape: self.nan(shape))
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 181, 150, generator=g)
    u, s, v, how = krylov_svd(_as(lib, a), 10)
    assert how == "krylov"
    for i in range(2):
        assert torch.isfinite(_t(u)).all() and _ratio(a[i], _t(u)[i], _t(s)[i], _t(v)[i], 10) <= 1.02
