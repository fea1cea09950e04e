"""Batched block Krylov SVD: the top-k SVD of same-shape matrices Δ (…, m, n) with fewer products with Δ
than subspace iteration, for LoRA extraction and PEFT's ``*_svd`` adapter merges.

Block Krylov with every block kept (Musco & Musco 2015, "Randomized block Krylov methods"), l columns per
block and q iterations, blocks orthogonalized as they are made (block Lanczos without the recurrence):

    Q_0 = orth(Δ·Ω)                                       Ω: n×l Gaussian, drawn on the CPU from ``seed``
    for i = 0..q:  W_i = Δᵀ·Q_i                           (n×l; kept: W = [W_0 … W_q] = Δᵀ·Q)
                   Q_{i+1} = orth(Δ·orth(W_i) ⊥ Q_0..Q_i)  (i < q)
    Q = [Q_0 … Q_q] (m×L, L = (q+1)·l, orthonormal);  QᵀΔ = Wᵀ
    WᵀW = Ũ·diag(S²)·Ũᵀ (eigh, L×L);  U = Q·Ũ_k,  V·S = W·Ũ_k    (Rayleigh-Ritz: Δ ≈ U·Uᵀ·Δ)

Products with Δ: 2(q+1) of l columns, every W_i computed once and reused for the final step (subspace
iteration recomputes Δᵀ·Q at the end, and keeps only its last block). Measured on the 168M benchmark
family's task vectors (flat noise spectra, the hard case: σ_1/σ_128 = 1.2-1.4, 61-73 % of ‖Δ‖² beyond
rank 128), k = 128, Frobenius error over the optimal rank-k error:

    subspace iteration, l = 2k, 2 power iterations (6 products of 256 columns)   1.0051-1.0076
    subspace iteration, l = 2k, 1 power iteration (4 of 256)                      1.0179-1.0183
    block Krylov, l = k/2, q = 4 (10 products of 64 columns: 2.4× fewer flops)    1.0090-1.0102
    block Krylov, l = k/2, q = 3 (8 of 64)                                        1.0181-1.0241
    block Krylov, l = k, q = 2 (6 of 128)                                         1.0082-1.0091

Numerics: Q_{i+1} is projected off the earlier blocks once, and again for a batch where a column kept less
than ``REORTH_BELOW`` of its norm ("twice is enough": an exactly low-rank Δ whose range the earlier blocks already
hold leaves only rounding noise, which one projection does not make orthogonal), and columns left with
less than 1e-4 of their block's norm are dropped (zero: that noise is not orthogonal to Q even after two
projections). The Ritz values come from
the eigenvalues of WᵀW only through ‖W·ũ_j‖ (S = column norms of W·Ũ_k), so the factors are a projection
of Δ however the small eigenvalues round, and an all-zero Δ gives zero factors. A batch member with NaN or
inf gets NaN factors and leaves the others as they would be alone (LAPACK's eigh of a non-finite matrix
fails for the whole call).

Two array libraries, one algorithm: ``a`` is a torch tensor (any device) or a numpy array; ``_TorchOps`` and
``_NumpyOps`` spell the few operations it needs. The numpy path imports no torch (``fastmerge extract-lora``
never pays torch's 1.9 s import). Its differences are the thin factorizations, which ``numpy.linalg``
computes in float64: on the 2-core machine one Householder QR of 2816×64 took 6.5 ms there and 1.7 ms in
torch (MKL, fp32), so numpy orthonormalizes by Cholesky QR in fp32 (Gram matrix, Cholesky, triangular
solve: 0.7 ms for two passes; a second pass only where the first left QᵀQ further than ``ORTHO_TOL`` from
I), falling back to Householder when the first Cholesky factor's diagonal spans more than
1/``CHOLQR_MIN_RATIO`` (ill-conditioned or rank-deficient blocks: fp32 CholQR2 is exact to rounding only
for condition numbers well below 1/√u ≈ 4000; deflated blocks always take the Householder path); eigh,
Cholesky and the inverses use numpy's float32 LAPACK loops (``_lapack32``).
On torch the thin factorizations (QR of m×l, eigh of L×L) run on one CPU thread
(``randomized_svd._one_thread``: MKL's LAPACK on thin matrices is bound by OpenMP barriers on small
machines); the products with Δ keep every thread.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Sequence

from .._lazy import torch
from .randomized_svd import _omega, _one_thread

#: default block columns l = ceil(k·BLOCK_SHARE) and iterations q (the table in the module docstring)
BLOCK_SHARE = 0.5
DEFAULT_ITERS = 4
#: re-project when a column keeps less than this share of its norm: one classical Gram-Schmidt projection
#: leaves y⊥ orthogonal to p within ~u·‖y‖/‖y⊥‖ (≤ 8u here, 5e-7 in fp32, for an SVD whose error is ~1e-2 of
#: optimal: enough), and the 168M family's noise blocks keep 33-44 % of their norm, so they project once.
#: Kahan-Parlett's "twice is enough" threshold 1/√2 made every block project twice: 8 % more flops per SVD.
#: Blocks of a decaying spectrum (1/i: 3-15 %) and of an exhausted Krylov space (~1e-7) still project twice.
REORTH_BELOW = 1 / 8
#: a new block's column whose part beyond the earlier blocks is below this share of the block's largest
#: column is dropped: fp32 rounding of the projection is ~1e-7 of it, so such a column is noise
DEFLATE = 1e-4
#: numpy's CholQR2 is kept when the first Cholesky factor's smallest diagonal is at least this share of its
#: largest (the block's condition number is then ~100 or less: fp32 CholQR2 is orthonormal to ~1e-6); else
#: Householder. The 168M family's noise blocks span 0.3-0.9; decaying spectra and deflated blocks fall back
CHOLQR_MIN_RATIO = 1e-2
#: numpy's CholQR stops after one pass when the pass's Q is orthonormal within this (largest entry of QᵀQ − I;
#: fp32 rounding of that Gram matrix is ~3e-6 at 2816 rows): the 168M family's noise blocks (condition ~3)
#: reach 1e-6 in one pass; the second pass was a quarter of the QR time (0.041 -> 0.030 s CPU of the ~0.5 s
#: SVD of five 2816×1024 task vectors)
ORTHO_TOL = 1e-5


def krylov_plan(k: int, shape: Sequence[int], block: int | None = None,
                iters: int = DEFAULT_ITERS) -> tuple[int, int] | None:
    """(l, q) for a rank-k SVD of (…, m, n) matrices, or None when the Krylov space would not be smaller
    than half of min(m, n) (then one exact SVD costs about as much: use ``torch.linalg.svd``)."""
    r = min(int(shape[-2]), int(shape[-1]))
    k = min(int(k), r)
    cols = max(1, int(block) if block else math.ceil(k * BLOCK_SHARE))
    q = max(0, int(iters))
    if (q + 1) * cols < k or (q + 1) * cols >= 0.5 * r:
        return None
    return cols, q


def _next_block(y: Any, p: Any, ops: Any) -> Any:
    """An orthonormal basis of y's part orthogonal to span(p) (p orthonormal): y projected off p once, again
    where a column kept less than 1/√2 of its norm ("twice is enough"), then QR; columns whose part beyond p
    is below ``DEFLATE`` of the block's largest column are set to zero (the Krylov space is exhausted: an
    exactly low-rank Δ whose range earlier blocks already hold leaves rounding noise, whose QR is not
    orthogonal to p: the test's rank-3 matrix lost 1e-3 of orthogonality per block without this)."""
    before = ops.colsq(y)
    y = y - p @ (ops.T(p) @ y)
    again = ops.any_below(ops.colsq(y), REORTH_BELOW ** 2 * before)
    if again:
        y = y - p @ (ops.T(p) @ y)
    q, r = ops.qr(y)
    if not again:
        return q
    scale = ops.amax_last(before) ** 0.5
    return ops.zero_cols(q, abs(ops.diag(r)) <= DEFLATE * scale)


def krylov_svd(a: Any, k: int, *, block: int | None = None, iters: int = DEFAULT_ITERS,
               seed: int = 0) -> tuple[Any, Any, Any, str]:
    """Top-k SVD of ``a`` (…, m, n), batched over leading dimensions: U (…, m, k), S (…, k), V (…, n, k) in
    fp32 with a ≈ U·diag(S)·Vᵀ, and "krylov", or "exact" where ``krylov_plan`` says the exact SVD is as cheap.
    ``a`` is a torch tensor (results on its device) or a numpy array (numpy results; torch is not imported).

    S is in decreasing order only up to the rounding of the Ritz values (each S_j is the norm of a row of
    the projection's Vᵀ·S, never an eigenvalue's square root)."""
    ops = _NumpyOps() if _is_numpy(a) else _TorchOps(a.device)
    a = ops.f32(a)
    lead, (m, n) = tuple(a.shape[:-2]), tuple(a.shape[-2:])
    k = min(int(k), m, n)
    a3 = a.reshape((-1, m, n))
    plan = krylov_plan(k, a.shape, block, iters)
    omega = None if plan is None else ops.omega(n, plan[0], seed)
    y = None if plan is None else a3 @ omega
    good = ops.finite(a3 if y is None else y)  # Δ·Ω of a non-finite Δ is non-finite: no pass over Δ
    if ops.all(good):
        u, s, v = _svd3(a3, y, omega, k, plan, ops)
    else:
        u, s, v = ops.nan((len(good), m, k)), ops.nan((len(good), k)), ops.nan((len(good), n, k))
        idx = ops.true_at(good)
        if len(idx):
            sub = a3[idx]
            u[idx], s[idx], v[idx] = _svd3(sub, None if y is None else sub @ omega, omega, k, plan, ops)
    how = "exact" if plan is None else "krylov"
    return u.reshape(lead + (m, k)), s.reshape(lead + (k,)), v.reshape(lead + (n, k)), how


def _svd3(a: Any, y: Any, omega: Any, k: int, plan: tuple[int, int] | None, ops: Any) -> tuple[Any, Any, Any]:
    """The module docstring's algorithm on a finite batch (B, m, n), y = a·Ω; the exact SVD where plan is None."""
    if plan is None:
        u, s, v = ops.svd(a)
        return u[..., :k], s[..., :k], v[..., :k]
    cols, q = plan
    b, m, n = a.shape
    width = (q + 1) * cols
    qm = ops.empty((b, m, width))  # Q = [Q_0 … Q_q]
    wm = ops.empty((b, n, width))  # W = ΔᵀQ
    for i in range(q + 1):
        qi = qm[..., i * cols:(i + 1) * cols]
        qi[...] = _next_block(y, qm[..., : i * cols], ops) if i else ops.qr(y)[0]
        wi = wm[..., i * cols:(i + 1) * cols]
        ops.matmul_into(ops.T(a), qi, wi)
        if i < q:
            y = a @ ops.basis(wi)
    _, ut = ops.eigh(ops.T(wm) @ wm)  # ascending
    ut = ops.top_desc(ut, k)
    vs = wm @ ut  # V·S, (B, n, k)
    s = ops.norm_cols(vs)
    return qm @ ut, s, vs / ops.where_pos(s)[..., None, :]


def _is_numpy(a: Any) -> bool:
    np = sys.modules.get("numpy")  # a numpy array means numpy is imported; the check imports nothing
    return np is not None and isinstance(a, np.ndarray)


class _TorchOps:
    """The algorithm's operations in torch: thin factorizations and reductions on one CPU thread."""

    def __init__(self, device: Any):
        self.device = device
        self.thin = _one_thread() if device.type == "cpu" else contextlib.nullcontext()

    def f32(self, a: Any) -> Any:
        return a.float()

    def empty(self, shape: tuple[int, ...]) -> Any:
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def nan(self, shape: tuple[int, ...]) -> Any:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=self.device)

    def omega(self, n: int, cols: int, seed: int) -> Any:
        return _omega(n, cols, seed, self.device)

    @staticmethod
    def T(x: Any) -> Any:
        return x.mT

    def qr(self, y: Any) -> tuple[Any, Any]:
        with self.thin:
            return torch.linalg.qr(y, mode="reduced")

    def basis(self, w: Any) -> Any:
        return self.qr(w)[0]

    def eigh(self, g: Any) -> tuple[Any, Any]:
        with self.thin:
            return torch.linalg.eigh(g)

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u, s, vh.mT

    def colsq(self, y: Any) -> Any:
        with self.thin:
            return y.square().sum(dim=-2)

    def any_below(self, x: Any, y: Any) -> bool:
        with self.thin:
            return bool((x < y).any())

    def norm_cols(self, x: Any) -> Any:
        with self.thin:
            return x.norm(dim=-2)

    @staticmethod
    def matmul_into(a: Any, b: Any, out: Any) -> None:
        torch.matmul(a, b, out=out) if out.is_contiguous() else out.copy_(a @ b)

    @staticmethod
    def finite(x: Any) -> Any:
        return torch.isfinite(x).flatten(-2).all(-1)

    @staticmethod
    def all(mask: Any) -> bool:
        return bool(mask.all())

    @staticmethod
    def true_at(mask: Any) -> Any:
        return mask.nonzero().flatten()

    @staticmethod
    def amax_last(x: Any) -> Any:
        return x.amax(dim=-1, keepdim=True)

    @staticmethod
    def diag(r: Any) -> Any:
        return r.diagonal(dim1=-2, dim2=-1)

    @staticmethod
    def zero_cols(q: Any, dead: Any) -> Any:
        return q.masked_fill(dead.unsqueeze(-2), 0.0)

    @staticmethod
    def top_desc(ut: Any, k: int) -> Any:
        return ut[..., -k:].flip(-1)

    @staticmethod
    def where_pos(s: Any) -> Any:
        return torch.where(s > 0, s, torch.ones_like(s))


def _lapack32() -> dict[str, Any]:
    """numpy's float32 LAPACK loops for eigh, Cholesky and inverse, where this numpy has them. ``numpy.linalg``
    computes float32 input in float64 (its wrappers pick the gufuncs' 'd' loops): the eigh of the 320×320 Gram
    matrix took 10.8 ms that way and 5.8 ms in float32 (ssyevd), 13 % of an SVD of eight 1024×1024 task
    vectors; torch runs these in float32 too. The gufuncs live in a private module (``numpy.linalg._umath_linalg``,
    numpy 1.8-2.x): without it, or without a float32 loop, the public functions run."""
    try:
        from numpy.linalg import _umath_linalg as ul
    except ImportError:
        return {}
    want = {"eigh_lo": "f->ff", "cholesky_lo": "f->f", "inv": "f->f"}
    return {name: getattr(ul, name) for name, sig in want.items() if sig in getattr(getattr(ul, name, None), "types", ())}


class _NumpyOps:
    """The algorithm's operations in numpy (no torch): Cholesky QR twice for the orthonormal bases."""

    def __init__(self) -> None:
        import numpy

        self.np = numpy
        self.lapack32 = _lapack32()

    def _cholesky(self, g: Any) -> Any:
        """Lower Cholesky factor; NaN (float32 loop) or LinAlgError (public one) where g is not positive definite."""
        if "cholesky_lo" in self.lapack32:
            with self.np.errstate(invalid="ignore"):
                return self.lapack32["cholesky_lo"](g, signature="f->f")
        return self.np.linalg.cholesky(g)

    def _inv(self, r: Any) -> Any:
        return self.lapack32["inv"](r, signature="f->f") if "inv" in self.lapack32 else self.np.linalg.inv(r)

    def f32(self, a: Any) -> Any:
        return self.np.asarray(a, dtype=self.np.float32)

    def empty(self, shape: tuple[int, ...]) -> Any:
        return self.np.empty(shape, dtype=self.np.float32)

    def nan(self, shape: tuple[int, ...]) -> Any:
        return self.np.full(shape, self.np.nan, dtype=self.np.float32)

    def omega(self, n: int, cols: int, seed: int) -> Any:
        rng = self.np.random.default_rng(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        return rng.standard_normal((n, cols), dtype=self.np.float32)

    @staticmethod
    def T(x: Any) -> Any:
        return x.swapaxes(-1, -2)

    def qr(self, y: Any) -> tuple[Any, Any]:
        """(Q, R) of y (B, m, l): Cholesky QR (Q = y·R⁻¹ with RᵀR = yᵀy; again on Q unless QᵀQ is within
        ``ORTHO_TOL`` of I) where the first R's diagonal spans less than 1/``CHOLQR_MIN_RATIO``, else LAPACK's
        Householder QR. R's diagonal is positive either way up to sign, which is all ``_next_block``'s
        deflation test reads."""
        np = self.np
        r1 = self._cholesky_r(y)
        if r1 is not None:
            q1 = y @ self._inv(r1)
            g = self.T(q1) @ q1
            if bool((abs(g - np.eye(g.shape[-1], dtype=g.dtype)) <= ORTHO_TOL).all()):
                return q1, r1  # the second pass would change nothing that matters (module docstring)
            r2 = self._cholesky_r(q1, g)  # q1 is orthonormal within ~u·κ² ≤ 1e-3: never None but for NaN
            if r2 is not None:
                return q1 @ self._inv(r2), r2 @ r1
        q, r = np.linalg.qr(y, mode="reduced")
        return q, r

    def basis(self, w: Any) -> Any:
        """A basis of span(w) for the next product: one Cholesky QR pass (orthonormal within ~u·κ², which a
        product's input does not need; ``qr``'s second pass is for the kept blocks), Householder's Q where
        ``qr`` would fall back."""
        r = self._cholesky_r(w)
        return self.qr(w)[0] if r is None else w @ self._inv(r)

    def _cholesky_r(self, y: Any, gram: Any = None) -> Any:
        """R of y's Cholesky QR (RᵀR = yᵀy = ``gram``), or None where the diagonal spans more than
        1/``CHOLQR_MIN_RATIO`` or the fp32 Gram matrix is not positive definite (then Householder)."""
        np = self.np
        try:
            r = self.T(self._cholesky(self.T(y) @ y if gram is None else gram))
        except np.linalg.LinAlgError:
            return None
        d = self.diag(r)
        return r if bool((d.min(axis=-1) >= CHOLQR_MIN_RATIO * d.max(axis=-1)).all()) else None  # NaN: False

    def eigh(self, g: Any) -> tuple[Any, Any]:
        if "eigh_lo" in self.lapack32:
            return self.lapack32["eigh_lo"](g, signature="f->ff")
        return self.np.linalg.eigh(g)

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        u, s, vh = self.np.linalg.svd(a, full_matrices=False)
        return u, s, self.T(vh)

    def colsq(self, y: Any) -> Any:
        return self.np.einsum("...ij,...ij->...j", y, y)

    @staticmethod
    def any_below(x: Any, y: Any) -> bool:
        return bool((x < y).any())

    def norm_cols(self, x: Any) -> Any:
        return self.np.sqrt(self.colsq(x))

    def matmul_into(self, a: Any, b: Any, out: Any) -> None:
        self.np.matmul(a, b, out=out)

    def finite(self, x: Any) -> Any:
        return self.np.isfinite(x).all(axis=(-2, -1))

    @staticmethod
    def all(mask: Any) -> bool:
        return bool(mask.all())

    def true_at(self, mask: Any) -> Any:
        return self.np.flatnonzero(mask)

    @staticmethod
    def amax_last(x: Any) -> Any:
        return x.max(axis=-1, keepdims=True)

    def diag(self, r: Any) -> Any:
        return self.np.diagonal(r, axis1=-2, axis2=-1)

    def zero_cols(self, q: Any, dead: Any) -> Any:
        return self.np.where(dead[..., None, :], self.np.float32(0), q)

    @staticmethod
    def top_desc(ut: Any, k: int) -> Any:
        return ut[..., : -k - 1 if k < ut.shape[-1] else None: -1]

    def where_pos(self, s: Any) -> Any:
        return self.np.where(s > 0, s, self.np.float32(1))
