"""fastmerge.ops.randomized_svd: accuracy against the exact SVD on realistic spectra, the torch path's
batching and chunking, energy selection, and the Triton kernels against the torch path (under
TRITON_INTERPRET=1 on CPU, set by tests/conftest.py; natively on a GPU)."""

import math
import os

import pytest
import torch

from fastmerge.ops.randomized_svd import (
    centered_factors, energy_rank, randomized_svd, reconstruct_add, target_rank, weight_average,
)

HAS_TRITON = True
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover
    HAS_TRITON = False
TRITON_OK = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton with CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def with_spectrum(m: int, n: int, sigma: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random m×n matrix with singular values ``sigma`` (random orthonormal singular vectors)."""
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return (u * sigma[:r]) @ v.T


def spectra(r: int) -> dict[str, torch.Tensor]:
    """Slowly decaying spectra of fine-tuning deltas (power laws, exponential), and a low-rank signal
    over a flat noise floor; not only Gaussian matrices (whose flat spectrum makes top-k ill-posed)."""
    i = torch.arange(1, r + 1, dtype=torch.float32)
    return {
        "power0.5": i ** -0.5,
        "power1": 1.0 / i,
        "exp": torch.exp(-i / (r / 12)),
        "lowrank+noise": torch.where(i <= 6, 10.0 / i, 0.05 * torch.ones_like(i)),
    }


def family(m: int, n: int, sigma: torch.Tensor, T: int, seed: int = 0, scale: float = 0.05):
    """T 'fine-tunes' of one base: base + τ_t, ‖τ_t‖ = scale·‖base‖, τ_t with spectrum ``sigma``."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(m, n, generator=g)
    xs = []
    for _ in range(T):
        tau = with_spectrum(m, n, sigma, g)
        xs.append(base + tau * (scale * base.norm() / tau.norm()))
    return xs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


# --------------------------------------------------------------------------------------------
# ranks


def test_target_rank():
    assert target_rank((768, 3072), 0.08) == 61  # ⌊61.44⌋
    assert target_rank((100, 300), 0.29) == 29  # 0.29·100 = 28.999999999999996 in binary
    assert target_rank((10, 30), 0.01) == 1  # at least one
    assert target_rank((10, 30), 0.0) == 0  # CART at k = 0 is the weight average
    assert target_rank((10, 30), 1.0) == 10
    assert target_rank((10, 30), 0.5, rank=7) == 7
    assert target_rank((10, 30), 0.5, rank=70) == 10


def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 14.0, 9 / 14) == 1
    assert energy_rank(s, 14.0, 0.65) == 2  # 9/14 = 0.643 < 0.65 ≤ 13/14
    assert energy_rank(s, 14.0, 1.0) == 3
    assert energy_rank(s, 0.0, 0.5) == 0  # a zero matrix needs no rank
    assert energy_rank(s, 28.0, 0.9) == 4  # not reached within s: the caller must widen the sketch


# --------------------------------------------------------------------------------------------
# accuracy against the exact SVD


@pytest.mark.parametrize("name", list(spectra(8)))
def test_randomized_near_optimal_on_realistic_spectra(name):
    m, n, T = 96, 256, 4
    k = target_rank((m, n), 0.08)  # 7
    xs = family(m, n, spectra(m)[name], T, seed=1)
    ex = centered_factors(xs, k, svd="exact")
    rn = centered_factors(xs, k, seed=3)
    assert ex.svd_kind == "exact" and rn.svd_kind == "randomized"
    for t in range(T):
        d = xs[t] - ex.avg
        opt = torch.linalg.norm(d - ex.lowrank(t))
        got = torch.linalg.norm(d - rn.lowrank(t))
        assert got <= 1.02 * opt, f"{name} task {t}: truncation error {got / opt:.4f}× optimal"
    assert rel(rn.reconstruct(), ex.reconstruct()) < 1e-2


def test_exact_rank_matrix_is_recovered():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 5, generator=g) @ torch.randn(5, 90, generator=g)  # rank 5 < l
    u, s, v = randomized_svd(a, 5, oversample=5, power_iters=0)
    assert rel((u * s) @ v.T, a) < 1e-5
    ref = torch.linalg.svdvals(a)[:5]
    assert torch.allclose(s, ref, rtol=1e-5)
    assert torch.allclose(u.T @ u, torch.eye(5), atol=1e-5) and torch.allclose(v.T @ v, torch.eye(5), atol=1e-5)


def test_batched_leading_dims_and_chunks_agree():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 40, 72, generator=g) for _ in range(3)]
    f = centered_factors(xs, 4, seed=5)  # chunk=1 on CPU
    f_all = centered_factors(xs, 4, seed=5, chunk=3)
    for b in range(3):
        fb = centered_factors([x[b] for x in xs], 4, seed=5)
        for t in range(3):
            assert rel(f.lowrank(t)[b], fb.lowrank(t)) < 1e-4
            assert rel(f_all.lowrank(t)[b], fb.lowrank(t)) < 1e-4
    out = f.reconstruct(0.5)
    for b in range(3):
        want = f.avg[b] + 0.5 * sum(f.lowrank(t)[b] for t in range(3))
        assert rel(out[b], want) < 1e-5


def test_large_k_switches_to_exact():
    xs = [torch.randn(30, 50) for _ in range(3)]
    f = centered_factors(xs, 10)  # l = 20 ≥ min(m, n)/2: a sketch would not be cheaper
    assert f.svd_kind == "exact"


def test_k0_and_full_rank_identities():
    xs = [torch.randn(20, 33) for _ in range(4)]
    avg = weight_average(xs)
    assert torch.equal(centered_factors(xs, 0).reconstruct(3.0), avg)
    # Σ_t Δ_t = 0, so keeping every singular triplet gives θ_avg back whatever λ is (up to fp32
    # rounding of 4 rank-20 reconstructions of entries ~|Δ| ≤ 4, scaled by 2.5: ~1e-5)
    assert (centered_factors(xs, 20).reconstruct(2.5) - avg).abs().max() < 1e-4


def test_energy_randomized_never_below_exact():
    m, n = 128, 200
    xs = family(m, n, spectra(m)["power1"], 3, seed=4)
    for e in (0.3, 0.6):
        ex = centered_factors(xs, svd="exact", energy=e)
        rn = centered_factors(xs, energy=e, seed=1)
        for t in range(3):
            d = xs[t] - ex.avg
            assert rn.ranks[t] >= ex.ranks[t]
            captured = float(rn.s[t].double().square().sum() / d.double().square().sum())
            assert captured >= e * (1 - 1e-4)
        assert ex.ranks != [0, 0, 0]


def test_energy_falls_back_to_exact_for_flat_spectra():
    xs = [torch.randn(40, 64) for _ in range(3)]  # flat: 0.9 of the energy needs most of the rank
    f = centered_factors(xs, energy=0.9)
    ex = centered_factors(xs, svd="exact", energy=0.9)
    assert f.ranks == ex.ranks
    assert rel(f.reconstruct(), ex.reconstruct()) < 1e-5


# --------------------------------------------------------------------------------------------
# Triton kernels against the torch path


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_centered_matmul_kernel(dtype, transpose, shared):
    from fastmerge.kernels.lowrank import centered_matmul

    g = torch.Generator().manual_seed(7)
    T, m, n, L = 3, 37, 83, 13  # odd sizes: every tile is masked somewhere
    xs = [torch.randn(m, n, generator=g).to(dtype).to(DEV) for _ in range(T)]
    avg = weight_average(xs)
    K = m if transpose else n
    b = torch.randn((K, L) if shared else (T, K, L), generator=g).to(DEV)
    got = centered_matmul(xs, avg, b, transpose=transpose)
    want = torch.stack([
        ((x.float() - avg).T if transpose else (x.float() - avg)) @ (b if shared else b[t]) for t, x in enumerate(xs)
    ])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@needs_triton
def test_centered_matmul_kernel_batched_and_uncentered():
    from fastmerge.kernels.lowrank import centered_matmul

    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(2, 19, 45, generator=g).to(DEV) for _ in range(2)]
    avg = weight_average(xs)
    b = torch.randn(45, 5, generator=g).to(DEV)
    got = centered_matmul(xs, avg, b)
    want = torch.stack([(x - avg) @ b for x in xs])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    got = centered_matmul(xs[:1], None, b)
    assert torch.allclose(got[0], xs[0] @ b, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("J", [0, 1, 21])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_reconstruct_add_kernel(J, batch):
    from fastmerge.kernels.lowrank import reconstruct_add as kernel

    g = torch.Generator().manual_seed(9)
    m, n = 41, 67
    avg = torch.randn(batch + (m, n), generator=g).to(DEV)
    left = torch.randn(batch + (m, J), generator=g).to(DEV)
    right = torch.randn(batch + (n, J), generator=g).to(DEV)
    got = kernel(avg, left, right, 0.7)
    want = reconstruct_add(avg, left, right, 0.7, backend="torch")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    out = torch.empty(batch + (m, n), dtype=torch.float32, device=DEV)
    assert kernel(avg, left, right, 0.7, out=out) is out and torch.allclose(out, want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_path_matches_torch_path(dtype):
    """The whole randomized CART through the kernels (same Ω) against the torch path."""
    m, n, T = 48, 70, 3
    xs = [x.to(dtype).to(DEV) for x in family(m, n, spectra(m)["power1"], T, seed=11)]
    k = 4
    ft = centered_factors(xs, k, seed=2, backend="triton", power_iters=1)
    fr = centered_factors(xs, k, seed=2, backend="torch", power_iters=1)
    assert ft.svd_kind == fr.svd_kind == "randomized"
    for t in range(T):
        assert rel(ft.lowrank(t), fr.lowrank(t)) < 1e-3
    got = ft.reconstruct(1.3, backend="triton")
    want = fr.reconstruct(1.3, backend="torch")
    assert rel(got, want) < 1e-5


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="needs CUDA"):
        centered_factors([torch.randn(20, 40) for _ in range(2)], 2, backend="triton")
    # auto on CPU: the torch path, never the (slow) interpreter
    f = centered_factors([torch.randn(40, 60) for _ in range(2)], 2)
    assert f.svd_kind == "randomized"
    assert math.isfinite(float(f.reconstruct().sum()))
