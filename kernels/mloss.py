"""Triton kernels for M-Loss (``fastmerge.mloss``): the q pre-activations and their reduction in one pass.

- ``fused_mloss``: from the shared input x [B, d_in] and stacked weights W [q, d_out, d_in] (+ bias
  [q, d_out]; gated MLPs: a second stack for ``up``), each program computes a [BLOCK_B, BLOCK_N] tile of
  every model's pre-activation h_a = x·W_aᵀ + b_a in turn (fp32 accumulation), folds it at once into two
  running tiles, Σ α_a h_a and Σ α_a σ(h_a), and reduces D = σ(Σ α h) − Σ α σ(h) in the epilogue:
  per node (column) Σ_b |D|, Σ_b D², Σ_b |D|/(|σ(Σαh)| + ε), and per sample (row) Σ_j D², Σ_j σ(Σαh)²,
  added with atomics. The q×B×d_out pre-activations never exist: extra memory is 3·d_out + 2·B fp32
  (for the issue's B = 128×197 = 25,216, d_out = 3072, q = 8: 0.24 MB instead of 2.5 GB).
- ``reduce_mloss``: the same epilogue from pre-activations already in hand, h [q, B, d_out].

The sums are accumulated with fp32 atomics, so their order (and the last bits) varies from run to run on
a GPU. The torch reference is ``fastmerge.mloss.reference``.

Interpreter (``TRITON_INTERPRET=1``, CPU tests): every load is upcast to fp32 at once (bf16 is held as
uint16 there) and tiles are large to cut the number of sequentially run programs. On a GPU, bf16 / fp16
operands go to ``tl.dot`` as they are (tensor cores, fp32 accumulation); fp32 uses ``input_precision``
("ieee" by default, as torch's own fp32 matmul without TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

#: activation codes: must match ``fastmerge.mloss.reference.ACT_CODES``
IDENTITY, RELU, LEAKY_RELU, GELU, GELU_TANH, QUICK_GELU, SILU = range(7)


@triton.jit
def _act(h, ACT: tl.constexpr, slope):
    if ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:
        h = tl.where(h >= 0, h, h * slope)
    elif ACT == 3:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 4:
        # tanh(z) = 2·sigmoid(2z) − 1; z = √(2/π)·(h + 0.044715·h³)
        z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        h = 0.5 * h * (2.0 * tl.sigmoid(2.0 * z))
    elif ACT == 5:
        h = h * tl.sigmoid(1.702 * h)
    elif ACT == 6:
        h = h * tl.sigmoid(h)
    return h


@triton.jit
def _epilogue(merged, merged_up, ens, offs_b, offs_n, mask_b, mask_n, node_ptr, samp_ptr, B, N, eps, slope,
              ACT: tl.constexpr, GATED: tl.constexpr):
    m = _act(merged, ACT, slope)
    if GATED:
        m = m * merged_up
    mask = mask_b[:, None] & mask_n[None, :]
    d = tl.where(mask, m - ens, 0.0)
    m = tl.where(mask, m, 0.0)
    ad = tl.abs(d)
    sq = d * d
    nrm = ad / (tl.abs(m) + eps)
    tl.atomic_add(node_ptr + offs_n, tl.sum(ad, axis=0), mask=mask_n)
    tl.atomic_add(node_ptr + N + offs_n, tl.sum(sq, axis=0), mask=mask_n)
    tl.atomic_add(node_ptr + 2 * N + offs_n, tl.sum(nrm, axis=0), mask=mask_n)
    tl.atomic_add(samp_ptr + offs_b, tl.sum(sq, axis=1), mask=mask_b)
    tl.atomic_add(samp_ptr + B + offs_b, tl.sum(m * m, axis=1), mask=mask_b)


@triton.jit
def _fused_kernel(
    x_ptr, w_ptr, b_ptr, wu_ptr, bu_ptr, alpha_ptr, node_ptr, samp_ptr,
    B, N, K, Q,
    sx_b, sx_k,
    sw_q, sw_n, sw_k,
    sb_q, sb_n,
    eps, slope,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_b = offs_b < B
    mask_n = offs_n < N
    merged = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    merged_up = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    ens = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for a in range(Q):
        al = tl.load(alpha_ptr + a)
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        a64 = tl.cast(a, tl.int64)  # q·d_out·d_in passes 2^31 for 70B-class MLPs
        w_base = w_ptr + a64 * sw_q
        wu_base = wu_ptr + a64 * sw_q
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            x = tl.load(x_ptr + offs_b[:, None] * sx_b + kk[None, :] * sx_k,
                        mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            # W_a is [N, K]: the [BLOCK_K, BLOCK_N] tile of W_aᵀ through the strides
            wm = mask_k[:, None] & mask_n[None, :]
            w = tl.load(w_base + kk[:, None] * sw_k + offs_n[None, :] * sw_n, mask=wm, other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            if GATED:
                wu = tl.load(wu_base + kk[:, None] * sw_k + offs_n[None, :] * sw_n, mask=wm, other=0.0)
                if UPCAST:
                    wu = wu.to(tl.float32)
                acc_up = tl.dot(x, wu, acc_up, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + a64 * sb_q + offs_n * sb_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(bu_ptr + a64 * sb_q + offs_n * sb_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        merged += al * acc
        if GATED:
            merged_up += al * acc_up
            ens += al * (_act(acc, ACT, slope) * acc_up)
        else:
            ens += al * _act(acc, ACT, slope)
    _epilogue(merged, merged_up, ens, offs_b, offs_n, mask_b, mask_n, node_ptr, samp_ptr, B, N, eps, slope, ACT, GATED)


@triton.jit
def _reduce_kernel(
    h_ptr, u_ptr, alpha_ptr, node_ptr, samp_ptr,
    B, N, Q,
    sh_q, sh_b, sh_n,
    su_q, su_b, su_n,
    eps, slope,
    ACT: tl.constexpr, GATED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_b = offs_b < B
    mask_n = offs_n < N
    mask = mask_b[:, None] & mask_n[None, :]
    merged = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    merged_up = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    ens = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for a in range(Q):
        al = tl.load(alpha_ptr + a)
        a64 = tl.cast(a, tl.int64)
        h = tl.load(h_ptr + a64 * sh_q + offs_b[:, None] * sh_b + offs_n[None, :] * sh_n, mask=mask, other=0.0).to(tl.float32)
        merged += al * h
        if GATED:
            u = tl.load(u_ptr + a64 * su_q + offs_b[:, None] * su_b + offs_n[None, :] * su_n, mask=mask, other=0.0).to(tl.float32)
            merged_up += al * u
            ens += al * (_act(h, ACT, slope) * u)
        else:
            ens += al * _act(h, ACT, slope)
    _epilogue(merged, merged_up, ens, offs_b, offs_n, mask_b, mask_n, node_ptr, samp_ptr, B, N, eps, slope, ACT, GATED)


def _fused_blocks(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps). GPU: 64×64 output tiles, K by 32, 8 warps: up to five live
    64×64 fp32 tiles (two running sums, the gated up sum, two accumulators) are 80 registers per thread
    at 256 threads. A starting point, not tuned: no GPU was available when this was written.
    Interpreter: programs run one after another in Python, so a few large tiles."""
    if interpreting():
        return 64, 64, 64, 1
    return 64, 64, 32, 8


def _alpha(alpha, q: int, device) -> torch.Tensor:
    a = torch.full((q,), 1.0 / q) if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
    return a.to(device=device, dtype=torch.float32).contiguous()


def fused_mloss(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, alpha=None, act: int = GELU,
    slope: float = 0.01, up_weight: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
    eps: float = 1e-4, precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(node sums [3, d_out], sample sums [2, B]) fp32, from x [B, d_in], W [q, d_out, d_in] (+ b [q, d_out];
    gated: ``up_weight``/``up_bias`` of the same shapes, σ(gate)·up). See the module docstring."""
    B, K = x.shape
    q, N, K2 = weight.shape
    assert K == K2, (x.shape, weight.shape)
    gated = up_weight is not None
    if gated:
        assert up_weight.shape == weight.shape and up_weight.stride() == weight.stride(), "up_weight must match weight"
        assert (bias is None) == (up_bias is None), "give both biases or neither"
    dev = x.device
    node = torch.zeros((3, N), dtype=torch.float32, device=dev)
    samp = torch.zeros((2, B), dtype=torch.float32, device=dev)
    if B == 0 or N == 0 or q == 0:
        return node, samp
    if bias is not None:
        bias = bias.contiguous()
        if gated:
            up_bias = up_bias.contiguous()
            assert up_bias.stride() == bias.stride()
    x_dt = x.dtype
    upcast = interpreting() or x_dt == torch.float32 or weight.dtype != x_dt
    BB, BN, BK, warps = _fused_blocks(N, K)
    grid = (triton.cdiv(B, BB), triton.cdiv(N, BN))
    al = _alpha(alpha, q, dev)
    _fused_kernel[grid](
        x, weight, bias if bias is not None else weight, up_weight if gated else weight,
        (up_bias if up_bias is not None else weight), al, node, samp,
        B, N, K, q,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        (bias.stride(0) if bias is not None else 0), (bias.stride(1) if bias is not None else 0),
        float(eps), float(slope),
        ACT=int(act), GATED=gated, HAS_BIAS=bias is not None, UPCAST=upcast,
        BLOCK_B=BB, BLOCK_N=BN, BLOCK_K=BK, PRECISION=precision, num_warps=warps,
    )
    return node, samp


def reduce_mloss(
    h: torch.Tensor, alpha=None, act: int = GELU, slope: float = 0.01, up: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(node sums [3, d], sample sums [2, B]) from pre-activations h [q, B, d] (gated: ``up`` [q, B, d])."""
    q, B, N = h.shape
    dev = h.device
    node = torch.zeros((3, N), dtype=torch.float32, device=dev)
    samp = torch.zeros((2, B), dtype=torch.float32, device=dev)
    if B == 0 or N == 0 or q == 0:
        return node, samp
    gated = up is not None
    if gated:
        assert up.shape == h.shape
    BB, BN = (64, 64) if interpreting() else (32, 128)
    grid = (triton.cdiv(B, BB), triton.cdiv(N, BN))
    u = up if gated else h
    _reduce_kernel[grid](
        h, u, _alpha(alpha, q, dev), node, samp,
        B, N, q,
        *h.stride(), *u.stride(),
        float(eps), float(slope),
        ACT=int(act), GATED=gated, BLOCK_B=BB, BLOCK_N=BN, num_warps=4 if not interpreting() else 1,
    )
    return node, samp
