"""Batched randomized SVD of centered task vectors, and the fused low-rank reconstruct-and-add.

Used by CART (``fastmerge.methods.cart``): for T same-shape matrices X_1..X_T with average A,

    Δ_t = X_t − A                              (centered task vectors; Σ_t Δ_t = 0)
    Δ_t ≈ U_t·diag(S_t)·V_tᵀ                   (top-k, randomized or exact)
    out = A + λ · Σ_t U_t·diag(S_t)·V_tᵀ       (one product with inner dimension T·k, added to A)

Randomized range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4 with re-normalised power
iterations, then Alg. 5.1), with l = k + oversample sketch columns and a Gaussian test matrix Ω (n×l)
drawn on the CPU from ``seed`` (the same Ω on every device and backend):

    Y = Δ·Ω
    repeat power_iters times:  Y = Δ·lu(Δᵀ·lu(Y))      (lu(Y) = P·L of Y = P·L·U: same span, cheap)
    Q = qr(Y);  W = Δᵀ·Q  (n×l, = Bᵀ with B = QᵀΔ);  W = Q_w·R_w;  R_wᵀ = Ũ·diag(S)·Ṽᵀ
    U = Q·Ũ,  V = Q_w·Ṽ                     (Δ ≈ U·diag(S)·Vᵀ, exact when Δ has rank ≤ l)

Only the products with Δ touch full-size data; everything else is an l-column matrix. Those products
run on one of two backends:

- ``torch`` (CPU, or CUDA without Triton): tasks are processed ``chunk`` at a time (1 on CPU): Δ of
  the chunk is formed once in an fp32 buffer (freed before the next chunk) and every product of the
  chunk reads it. Peak extra memory: A + one m×n buffer per task of the chunk, whatever T is.
- ``triton`` (CUDA; on CPU only under ``TRITON_INTERPRET=1``, for tests): ``kernels/lowrank.py`` loads a
  tile of X_t and of A, subtracts in registers and multiplies, so Δ_t never exists in memory; the
  reconstruction adds A and scales by λ in the GEMM epilogue. The small factorizations (LU / QR of
  m×l and n×l, SVD of l×l) are batched over all T tasks with ``torch.linalg``.

When l ≥ min(m, n)/2 the randomized path has no advantage (and is no longer a sketch): the exact SVD
is used instead (``svd_kind`` of the result says which ran).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

from .._lazy import torch
from ..kernels import interpreting

#: Oversampling p (l = k + p). ``None`` = auto: p = max(10, k), i.e. l = 2k. Halko et al.'s p = 10 is
#: enough for the truncation error (‖Δ − Δ̃_k‖_F ≤ 1.01× optimal with 2 power iterations on 768×3072,
#: k = 61), but CART sums the approximants themselves, and on slowly decaying spectra the top-k
#: subspace is only resolved when (σ_k/σ_{l+1})^(2q+1) is large. With σ_i ∝ i^-0.5, T = 8, 768×3072,
#: the merged output's relative distance to exact CART was 2.5e-2 at p = 10, q = 2; 9.4e-3..9.7e-3 at
#: p = k, q = 2 (too close to the 1e-2 target); 4.0e-3..4.5e-3 at p = k, q = 3 (4 seeds each). Cost is
#: linear in l·(2q + 2): p = k, q = 3 is ~2.7× the sketch of p = 10, q = 2, still ≥ 3× faster than one
#: full SVD per task on 2 cores (bench/bench_cart.py, bench/RESULTS.md).
DEFAULT_OVERSAMPLE: int | None = None
DEFAULT_POWER_ITERS = 3
#: Above this share of min(m, n), a sketch of l columns costs as much as the exact SVD: use that.
EXACT_ABOVE = 0.5

BACKENDS = ("auto", "torch", "triton")


# --------------------------------------------------------------------------------------------
# helpers


def weight_average(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ_avg in fp32: Σ x_t accumulated in input order, then / T (one fp32 rounding per step, as
    ``linear`` with equal weights)."""
    acc = torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for x in xs:
        acc.add_(x)
    return acc.div_(len(xs))


def target_rank(shape: Sequence[int], rank_ratio: float = 0.0, rank: int = 0) -> int:
    """k for a matrix of ``shape`` (…, m, n): ``rank`` if > 0 (capped at min(m, n)), else
    max(1, ⌊rank_ratio·min(m, n)⌋), and 0 for rank_ratio = 0 (CART reduces to the weight average).

    The floor has a 1e-9 guard so that ratios like 0.29 on 100 columns give 29, not 28 (0.29·100 is
    28.999999999999996 in binary floating point)."""
    r = min(int(shape[-2]), int(shape[-1]))
    if rank > 0:
        return min(int(rank), r)
    if rank_ratio <= 0:
        return 0
    return min(r, max(1, math.floor(rank_ratio * r + 1e-9)))


def energy_rank(s: torch.Tensor, total: float, energy: float) -> int:
    """Smallest k with Σ_{i<k} s_i² ≥ energy·total (``total`` = ‖Δ‖_F²); 0 for a zero matrix."""
    if total <= 0 or energy <= 0 or s.numel() == 0:
        return 0
    cum = torch.cumsum(s.double() ** 2, 0)
    hit = (cum >= energy * total * (1 - 1e-12)).nonzero()
    return int(hit[0]) + 1 if hit.numel() else s.numel() + 1  # > len(s): not reached within s


def auto_oversample(k: int, oversample: int | None) -> int:
    """p for rank k: ``oversample`` if given, else max(10, k)."""
    return max(10, int(k)) if oversample is None else int(oversample)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1, for tests)")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _omega(n: int, l: int, seed: int, device: torch.device) -> torch.Tensor:
    """The Gaussian test matrix (n×l), drawn on the CPU so every device/backend sketches alike."""
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(n, l, generator=g, dtype=torch.float32).to(device)


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _lu_basis(y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of span(y) (…, m, l), m ≥ l: P·L of the pivoted LU y = P·L·U
    (unit lower-trapezoidal L, |L_ij| ≤ 1). Used between power iterations instead of a QR, as
    scikit-learn's randomized range finder does: only the final basis must be orthonormal, and
    ``lu_factor`` costs 3 ms where ``qr`` (which also forms Q) costs 10 ms on a 2816×162 matrix
    (1 thread; 12 vs 220 ms with 2 threads on a busy 2-core machine)."""
    lu, piv, _ = torch.linalg.lu_factor_ex(y)  # a rank-deficient y (a zero or low-rank Δ) is fine: P·L still spans it
    m, l = y.shape[-2], y.shape[-1]
    basis = lu.tril(-1)
    basis.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    # LAPACK pivots: row i was swapped with row piv[i] - 1, in order; rows of y in L's order = perm
    flat = piv.reshape(-1, l).cpu().tolist()
    perms = []
    for p in flat:
        perm = list(range(m))
        for i, j in enumerate(p):
            j -= 1
            perm[i], perm[j] = perm[j], perm[i]
        perms.append(perm)
    idx = torch.tensor(perms, device=y.device).reshape(y.shape[:-2] + (m, 1)).expand(y.shape)
    return torch.empty_like(basis).scatter_(-2, idx, basis)  # row perm[i] of P·L is row i of L


# --------------------------------------------------------------------------------------------
# products with the centered task vectors


class _TorchCentered:
    """Δ_t = X_t − A formed once for a chunk of tasks (one fp32 buffer per task of the chunk)."""

    def __init__(self, xs: Sequence[torch.Tensor], avg: torch.Tensor | None):
        d = torch.empty((len(xs),) + tuple(xs[0].shape), dtype=torch.float32, device=xs[0].device)
        for i, x in enumerate(xs):
            if avg is None:
                d[i].copy_(x)
            else:
                torch.sub(x, avg, out=d[i])
        self.d = d

    def mm(self, b: torch.Tensor) -> torch.Tensor:  # (T', *B, m, l)
        return torch.matmul(self.d, b)

    def mm_t(self, q: torch.Tensor) -> torch.Tensor:  # (T', *B, n, l)
        return torch.matmul(self.d.mT, q)

    def sq_norms(self) -> torch.Tensor:
        return self.d.square().sum(dim=(-2, -1))


class _TritonCentered:
    """Δ_t never materialised: each product loads tiles of X_t and A and subtracts in registers."""

    def __init__(self, xs: Sequence[torch.Tensor], avg: torch.Tensor | None):
        self.xs, self.avg = list(xs), avg

    def mm(self, b: torch.Tensor) -> torch.Tensor:
        from fastmerge.kernels.lowrank import centered_matmul

        return centered_matmul(self.xs, self.avg, b, transpose=False)

    def mm_t(self, q: torch.Tensor) -> torch.Tensor:
        from fastmerge.kernels.lowrank import centered_matmul

        return centered_matmul(self.xs, self.avg, q, transpose=True)

    def sq_norms(self) -> torch.Tensor:  # one full-size temporary at a time, freed at once
        return torch.stack([(x - self.avg).square().sum(dim=(-2, -1)) for x in self.xs])


class _one_thread:
    """The thin factorizations (LU / QR of m×l, SVD of l×l) on one CPU thread. MKL's LAPACK on such thin
    matrices is bound by OpenMP barriers: on the 2-core machine, busy, a batch of 8 QRs of 2816×138 took
    2.0 s with 2 threads and 0.24 s with 1, 8 SVDs of 138×138 1.6 s vs 0.03 s. The GEMMs keep every thread."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        if self.n > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.n > 1:
            torch.set_num_threads(self.n)


def _sketch_svd(op, omega: torch.Tensor, power_iters: int):
    """Randomized SVD of every Δ_t of ``op`` at l = omega.shape[1] columns:
    U (T', *B, m, l), S (T', *B, l), V (T', *B, n, l)."""
    cpu = omega.device.type == "cpu"
    thin = _one_thread() if cpu else contextlib.nullcontext()
    q = op.mm(omega)
    for _ in range(power_iters):
        with thin:
            b = _lu_basis(q)
        b = op.mm_t(b)
        with thin:
            b = _lu_basis(b)
        q = op.mm(b)
    with thin:
        q = _orth(q)
    w = op.mm_t(q)  # = (QᵀΔ)ᵀ
    with thin:
        qw, rw = torch.linalg.qr(w, mode="reduced")
        ut, s, vth = torch.linalg.svd(rw.mT, full_matrices=False)  # l×l
    return q @ ut, s, qw @ vth.mT


# --------------------------------------------------------------------------------------------
# public API


@dataclasses.dataclass
class CenteredFactors:
    """θ_avg and the rank-k factors of each centered task vector Δ_t ≈ us_t·v_tᵀ (us = U·diag(S)).

    Tensors are fp32 on the inputs' device; ``us[t]`` is (*B, m, k_t), ``v[t]`` (*B, n, k_t), ``s[t]``
    (*B, k_t), singular values in decreasing order. ``svd_kind`` is "exact" or "randomized"."""

    avg: torch.Tensor
    us: list[torch.Tensor]
    v: list[torch.Tensor]
    s: list[torch.Tensor]
    svd_kind: str

    @property
    def ranks(self) -> list[int]:
        return [int(s.shape[-1]) for s in self.s]

    def lowrank(self, t: int, k: int | None = None) -> torch.Tensor:
        """SVD_k(Δ_t) as a dense fp32 matrix."""
        k = self.ranks[t] if k is None else min(k, self.ranks[t])
        return self.us[t][..., :k] @ self.v[t][..., :k].mT

    def reconstruct(
        self, lam: float = 1.0, k: int | None = None, out: torch.Tensor | None = None, backend: str = "auto"
    ) -> torch.Tensor:
        """avg + λ·Σ_t SVD_k(Δ_t) (k=None: every factor kept), one GEMM with inner dimension Σ_t k_t."""
        ks = [r if k is None else min(k, r) for r in self.ranks]
        left = torch.cat([u[..., :kt] for u, kt in zip(self.us, ks)], dim=-1)
        right = torch.cat([v[..., :kt] for v, kt in zip(self.v, ks)], dim=-1)
        return reconstruct_add(self.avg, left, right, lam, out=out, backend=backend)


def reconstruct_add(
    avg: torch.Tensor, left: torch.Tensor, right: torch.Tensor, lam: float = 1.0,
    out: torch.Tensor | None = None, backend: str = "auto",
) -> torch.Tensor:
    """out = avg + λ·left·rightᵀ for avg (*B, m, n), left (*B, m, J), right (*B, n, J); fp32 math.

    torch: one ``addmm``/``baddbmm`` (the GEMM adds ``avg`` itself: no separate pass over m×n).
    triton: ``kernels.lowrank.reconstruct_add`` with the add and the λ scale in the GEMM epilogue."""
    be = _resolve_backend(backend, avg.device)
    if be == "triton":
        from fastmerge.kernels.lowrank import reconstruct_add as kernel

        return kernel(avg, left, right, float(lam), out=out)
    avg = avg.float()
    left, right = left.float(), right.float()
    if avg.dim() == 2:
        res = torch.addmm(avg, left, right.mT, alpha=lam)
    else:
        shape = avg.shape
        b = math.prod(shape[:-2])  # explicit: a 0-column factor has no "-1" to infer
        res = torch.baddbmm(
            avg.reshape(b, *shape[-2:]), left.reshape(b, *left.shape[-2:]), right.reshape(b, *right.shape[-2:]).mT,
            alpha=lam,
        ).reshape(shape)
    if out is not None:
        out.copy_(res)
        return out
    return res


def exact_factors(xs: Sequence[torch.Tensor], avg: torch.Tensor, k: int | None, energy: float = 0.0):
    """Top-k (or energy-selected) factors of every Δ_t from one full ``torch.linalg.svd`` per task."""
    us, vs, ss = [], [], []
    for x in xs:
        d = x.float() - avg
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        kt = energy_rank(s, float(s.double().square().sum()), energy) if energy > 0 else min(int(k or 0), s.shape[-1])
        kt = min(kt, s.shape[-1])
        us.append(u[..., :kt] * s[..., None, :kt])
        vs.append(vh[..., :kt, :].mT)
        ss.append(s[..., :kt])
        del d, u, vh
    return us, vs, ss


def centered_factors(
    xs: Sequence[torch.Tensor],
    k: int | None = None,
    *,
    svd: str = "randomized",
    energy: float = 0.0,
    oversample: int | None = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    backend: str = "auto",
    chunk: int | None = None,
    avg: torch.Tensor | None = None,
) -> CenteredFactors:
    """Rank-k factors of the centered task vectors Δ_t = x_t − mean(x) of T same-shape tensors
    (…, m, n), batched over the leading dimensions and over tasks.

    ``energy`` > 0 picks k_t per task as the smallest rank holding that share of ‖Δ_t‖_F² (2-D inputs
    only). With ``svd="randomized"`` the sketch starts at l = k0 + p columns, k0 = max(16, min(m,n)/16),
    and doubles until the computed singular values reach the share (they are Ritz values, lower bounds of
    the true ones, so k_t can only come out larger than the exact SVD's), switching to the exact SVD past
    min(m, n)/2. ``chunk``: tasks per torch batch (default 1 on CPU: one Δ buffer; all on CUDA)."""
    if not xs:
        raise ValueError("centered_factors: no tensors")
    shape = tuple(xs[0].shape)
    if len(shape) < 2:
        raise ValueError(f"centered_factors: needs matrices (…, m, n), got shape {list(shape)}")
    for i, x in enumerate(xs):
        if tuple(x.shape) != shape:
            raise ValueError(f"centered_factors: tensor #{i} has shape {list(x.shape)}, #0 {list(shape)}")
    if svd not in ("randomized", "exact"):
        raise ValueError(f"svd must be 'randomized' or 'exact', got {svd!r}")
    if energy > 0 and len(shape) != 2:
        raise ValueError("centered_factors: energy selection needs 2-D matrices")
    m, n = shape[-2], shape[-1]
    r = min(m, n)
    device = xs[0].device
    if avg is None:
        avg = weight_average(xs)
    be = _resolve_backend(backend, device)
    if energy <= 0:
        k = min(int(k or 0), r)
        oversample = auto_oversample(k, oversample)
        if k == 0:
            empty = [torch.zeros(shape[:-2] + (d, 0), device=device) for d in (m, n)]
            return CenteredFactors(avg, [empty[0]] * len(xs), [empty[1]] * len(xs),
                                   [torch.zeros(shape[:-2] + (0,), device=device)] * len(xs), svd)
    if svd == "exact" or (energy <= 0 and k + oversample >= EXACT_ABOVE * r):
        us, vs, ss = exact_factors(xs, avg, k, energy)
        return CenteredFactors(avg, us, vs, ss, "exact")
    if chunk is None:
        chunk = len(xs) if device.type == "cuda" else 1

    def run(idx: list[int], l: int):
        """(U, S, V, ‖Δ‖²) for the tasks ``idx`` at l sketch columns."""
        outs = []
        step = len(idx) if be == "triton" else chunk
        omega = _omega(n, l, seed, device)  # one test matrix for every task (each sketch is still valid)
        for c0 in range(0, len(idx), step):
            sub = [xs[i] for i in idx[c0:c0 + step]]
            op = _TritonCentered(sub, avg) if be == "triton" else _TorchCentered(sub, avg)
            u, s, v = _sketch_svd(op, omega, power_iters)
            outs.append((u, s, v, op.sq_norms() if energy > 0 else None))
            del op
        cat = lambda j: None if outs[0][j] is None else torch.cat([o[j] for o in outs])  # noqa: E731
        return cat(0), cat(1), cat(2), cat(3)

    T = len(xs)
    if energy <= 0:
        u, s, v, _ = run(list(range(T)), k + oversample)
        return CenteredFactors(avg, [u[t, ..., :k] * s[t, ..., None, :k] for t in range(T)],
                               [v[t, ..., :k] for t in range(T)], [s[t, ..., :k] for t in range(T)], "randomized")
    # energy: adaptive sketch size
    res: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    todo = list(range(T))
    k0 = max(16, r // 16)
    oversample = auto_oversample(k0, oversample)
    l = k0 + oversample
    kind = "randomized"
    while todo:
        if l >= EXACT_ABOVE * r:
            us, vs, ss = exact_factors([xs[i] for i in todo], avg, None, energy)
            for j, i in enumerate(todo):
                res[i] = (us[j], vs[j], ss[j])
            kind = "exact" if len(todo) == T else "randomized+exact"
            break
        u, s, v, tot = run(todo, l)
        left = []
        for j, i in enumerate(todo):
            kt = energy_rank(s[j], float(tot[j]), energy)
            if kt <= l - oversample:  # the last `oversample` Ritz values are the least accurate
                res[i] = (u[j, :, :kt] * s[j, None, :kt], v[j, :, :kt], s[j, :kt])
            else:
                left.append(i)
        todo, l = left, 2 * l
    return CenteredFactors(avg, [res[t][0] for t in range(T)], [res[t][1] for t in range(T)],
                           [res[t][2] for t in range(T)], kind)


def randomized_svd(
    a: torch.Tensor, k: int, *, oversample: int | None = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of ``a`` (…, m, n), batched over leading dimensions: U (…, m, k), S (…, k), V (…, n, k),
    a ≈ U·diag(S)·Vᵀ. Exact (``torch.linalg.svd``) when k + oversample ≥ min(m, n)/2."""
    r = min(a.shape[-2], a.shape[-1])
    k = min(int(k), r)
    oversample = auto_oversample(k, oversample)
    if k + oversample >= EXACT_ABOVE * r:
        u, s, vh = torch.linalg.svd(a.float(), full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :].mT
    be = _resolve_backend(backend, a.device)
    op = _TritonCentered([a], None) if be == "triton" else _TorchCentered([a], None)  # no centering
    u, s, v = _sketch_svd(op, _omega(a.shape[-1], k + oversample, seed, a.device), power_iters)
    return u[0, ..., :k], s[0, ..., :k], v[0, ..., :k]


def centered_lowrank_merge(
    xs: Sequence[torch.Tensor], k: int | None = None, lam: float = 1.0, **kwargs
) -> torch.Tensor:
    """CART for one group of same-shape matrices: avg + λ·Σ_t SVD_k(x_t − avg), fp32.
    Keyword arguments go to ``centered_factors`` (svd, energy, oversample, power_iters, seed, backend)."""
    backend = kwargs.get("backend", "auto")
    f = centered_factors(xs, k, **kwargs)
    return f.reconstruct(lam, backend=backend)
