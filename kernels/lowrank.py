"""Triton kernels for CART's randomized SVD (``fastmerge.ops.randomized_svd``).

- ``centered_matmul``: Y_t = (X_t − A)·B_t or (X_t − A)ᵀ·B_t. A tile of X_t (any float dtype) and
  the same tile of A (fp32) are loaded, upcast, subtracted in registers and fed to ``tl.dot``: the
  centered task vector Δ_t never exists in memory (T full-size copies saved: 8 × 4096×14336 fp32 is
  1.9 GB). Used for the sketch Δ·Ω, the power iterations and the final projection Δᵀ·Q.
- ``reconstruct_add``: out = A + λ·L·Rᵀ, L (m×J), R (n×J), J = Σ_t k_t: the merged low-rank update
  of all tasks as one GEMM with inner dimension T·k, with the add of A and the scale λ in the epilogue
  (one pass over the m×n output instead of three).

Both are batched over leading matrix dimensions (grid axis 2). fp32 accumulation, and
``input_precision="ieee"`` by default: torch's own CUDA matmul does not use TF32 by default, so the
Triton and torch paths agree; "tf32" is faster on tensor cores and is accepted by the launchers.

Interpreter (``TRITON_INTERPRET=1``, CPU tests): every load is upcast to fp32 right away (bf16 is
stored as uint16 there), launchers never query the driver, and block sizes are larger to cut the
number of sequential programs. No module-level numpy arrays (they break the interpreter's patching).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import interpreting


@triton.jit
def _centered_matmul_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr,
    P, K, L,
    sx_z, sx_p, sx_k,
    sa_z, sa_p, sa_k,
    sb_z, sb_k, sb_l,
    sy_z, sy_p, sy_l,
    CENTER: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Y[z] (P×L) = (X[z] − A[z]) (P×K) · B[z] (K×L); transposition is done by the caller's strides.
    pid_p = tl.program_id(0)
    pid_l = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_l = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_p = offs_p < P
    mask_l = offs_l < L
    acc = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        m_pk = mask_p[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + z * sx_z + offs_p[:, None] * sx_p + kk[None, :] * sx_k, mask=m_pk, other=0.0).to(tl.float32)
        if CENTER:
            a = tl.load(a_ptr + z * sa_z + offs_p[:, None] * sa_p + kk[None, :] * sa_k, mask=m_pk, other=0.0).to(tl.float32)
            x = x - a
        b = tl.load(
            b_ptr + z * sb_z + kk[:, None] * sb_k + offs_l[None, :] * sb_l,
            mask=mask_k[:, None] & mask_l[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.dot(x, b, acc, input_precision=PRECISION)
    tl.store(y_ptr + z * sy_z + offs_p[:, None] * sy_p + offs_l[None, :] * sy_l, acc, mask=mask_p[:, None] & mask_l[None, :])


@triton.jit
def _reconstruct_add_kernel(
    a_ptr, l_ptr, r_ptr, o_ptr, lam,
    M, N, J,
    sa_z, sa_m, sa_n,
    sl_z, sl_m, sl_j,
    sr_z, sr_n, sr_j,
    so_z, so_m, so_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # out[z] = A[z] + lam · L[z] (M×J) · R[z]ᵀ (J×N)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        jj = j0 + offs_j
        mask_j = jj < J
        lt = tl.load(l_ptr + z * sl_z + offs_m[:, None] * sl_m + jj[None, :] * sl_j,
                     mask=mask_m[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
        rt = tl.load(r_ptr + z * sr_z + jj[:, None] * sr_j + offs_n[None, :] * sr_n,
                     mask=mask_j[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(lt, rt, acc, input_precision=PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    a = tl.load(a_ptr + z * sa_z + offs_m[:, None] * sa_m + offs_n[None, :] * sa_n, mask=mask, other=0.0).to(tl.float32)
    res = a + lam * acc
    tl.store(o_ptr + z * so_z + offs_m[:, None] * so_m + offs_n[None, :] * so_n, res.to(o_ptr.dtype.element_ty), mask=mask)


def _blocks(cols: int) -> tuple[int, int, int, int]:
    """(BLOCK rows, BLOCK cols, BLOCK inner, num_warps). GPU: 64×64×32 tiles, 4 warps (fp32 FMA dot).
    Interpreter: programs run one after another in Python, so fewer, larger tiles (64 KB of fp32)."""
    if interpreting():
        return 64, 64, 64, 1
    bl = 64 if cols > 32 else 32
    return 64, bl, 32, 4


def _as_batched(t: torch.Tensor) -> torch.Tensor:
    """(*B, r, c) → (Bf, r, c) without copying when possible (a view)."""
    b = 1
    for d in t.shape[:-2]:
        b *= d
    return t.reshape(b, t.shape[-2], t.shape[-1])  # explicit b: a 0-column tensor has no "-1"


def centered_matmul(
    xs: Sequence[torch.Tensor], avg: torch.Tensor | None, b: torch.Tensor, transpose: bool = False,
    precision: str = "ieee",
) -> torch.Tensor:
    """Y (T, *B, P, L): Y[t] = (X_t − A)·B[t] (P = m) or (X_t − A)ᵀ·B[t] (P = n, ``transpose``).

    ``xs``: T tensors (*B, m, n), any float dtype; ``avg``: fp32 (*B, m, n) or None (no centering);
    ``b``: (K, L) shared by every task and batch entry, or (T, *B, K, L)."""
    T = len(xs)
    shape = tuple(xs[0].shape)
    batch, m, n = shape[:-2], shape[-2], shape[-1]
    P, K = (n, m) if transpose else (m, n)
    L = b.shape[-1]
    dev = xs[0].device
    y = torch.empty((T,) + batch + (P, L), dtype=torch.float32, device=dev)
    if T == 0 or P == 0 or L == 0:
        return y
    shared = b.dim() == 2
    b = b.float()
    bz = b if shared else b.reshape(T, -1, K, L)
    a3 = None if avg is None else _as_batched(avg)
    BP, BL, BK, warps = _blocks(L)
    for t, x in enumerate(xs):
        x3 = _as_batched(x)
        Z = x3.shape[0]
        y3 = y[t].reshape(Z, P, L)
        bt = bz if shared else bz[t]
        sx = (x3.stride(0), x3.stride(2), x3.stride(1)) if transpose else x3.stride()
        if a3 is None:
            sa = (0, 0, 0)
        else:
            sa = (a3.stride(0), a3.stride(2), a3.stride(1)) if transpose else a3.stride()
        sb = (0, bt.stride(0), bt.stride(1)) if shared else bt.stride()
        grid = (triton.cdiv(P, BP), triton.cdiv(L, BL), Z)
        _centered_matmul_kernel[grid](
            x3, x3 if a3 is None else a3, bt, y3,
            P, K, L,
            *sx, *sa, *sb, *y3.stride(),
            CENTER=a3 is not None,
            BLOCK_P=BP, BLOCK_L=BL, BLOCK_K=BK, PRECISION=precision, num_warps=warps,
        )
    return y


def reconstruct_add(
    avg: torch.Tensor, left: torch.Tensor, right: torch.Tensor, lam: float,
    out: torch.Tensor | None = None, precision: str = "ieee",
) -> torch.Tensor:
    """out (*B, m, n) = avg + λ·left·rightᵀ; left (*B, m, J), right (*B, n, J). ``out`` defaults to a new
    fp32 tensor; any float dtype is accepted (rounded at the store)."""
    shape = tuple(avg.shape)
    m, n = shape[-2], shape[-1]
    J = left.shape[-1]
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=avg.device)
    if out.numel() == 0:
        return out
    a3, l3, r3 = _as_batched(avg), _as_batched(left.float()), _as_batched(right.float())
    o3 = out.view(-1, m, n) if out.is_contiguous() else None
    target = o3 if o3 is not None else torch.empty((a3.shape[0], m, n), dtype=out.dtype, device=out.device)
    BM, BN, BJ, warps = _blocks(n)
    grid = (triton.cdiv(m, BM), triton.cdiv(n, BN), a3.shape[0])
    _reconstruct_add_kernel[grid](
        a3, l3, r3, target, float(lam),
        m, n, J,
        *a3.stride(), *l3.stride(), *r3.stride(), *target.stride(),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_J=BJ, PRECISION=precision, num_warps=warps,
    )
    if o3 is None:
        out.copy_(target.reshape(shape))
    return out
