"""The counter-based generator of ``fastmerge.methods.rng``, in Triton, bit for bit.

Same algorithm (see that module's docstring): per (seed, tensor key, model) two stream keys k0, k1
computed on the host by ``rng.stream_keys`` (Python ints, once per tensor and model); per element i

    h = mix32(mix32(lo ^ k0) ^ mix32(k1 ^ hi)),   lo = i mod 2^32, hi = i >> 32
    keep (scalar p):  h < ceil(fp32(p)·2^24)·256          (the same test as u < fp32(p))
    keep (per-element p): u < p,  u = (h >> 8)·2^-24       (exact in fp32)

All arithmetic in ``tl.uint32``: multiplication wraps modulo 2^32 and ``>>`` is logical, exactly the
``& 0xFFFFFFFF`` arithmetic of the torch path. ``mix32(k1 ^ hi)`` depends on the element only through
hi, which is 0 below 2^32 elements: the host passes ``mix32(k1)`` and kernels recompute it per element
only when a segment reaches index 2^32 (``BIG``), saving 8 of the ~26 integer ops per element.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from fastmerge.methods import rng

_MUL1: tl.constexpr = tl.constexpr(rng.MUL1)
_MUL2: tl.constexpr = tl.constexpr(rng.MUL2)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 values (a bijection; ``rng.mix32``)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), _MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), _MUL2, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def hash_u32(idx, k0, k1h, k1, BIG: tl.constexpr):
    """The raw 32-bit output h of elements ``idx`` (int64) of the stream (k0, k1); ``k1h`` = mix32(k1)
    (used when not BIG: every index below 2^32). The mix32 rounds are written out: a nested jit call
    costs ~3 ms per program under the interpreter (it re-patches the language module each time)."""
    m1 = tl.full((), _MUL1, tl.uint32)
    m2 = tl.full((), _MUL2, tl.uint32)
    if BIG:
        kh = k1 ^ (idx >> 32).to(tl.uint32)
        kh = kh ^ (kh >> 16)
        kh = kh * m1
        kh = kh ^ (kh >> 15)
        kh = kh * m2
        kh = kh ^ (kh >> 16)
    else:
        kh = k1h
    x = idx.to(tl.uint32) ^ k0
    x = x ^ (x >> 16)
    x = x * m1
    x = x ^ (x >> 15)
    x = x * m2
    x = x ^ (x >> 16)
    x = x ^ kh
    x = x ^ (x >> 16)
    x = x * m1
    x = x ^ (x >> 15)
    x = x * m2
    x = x ^ (x >> 16)
    return x


@triton.jit
def uniform(h):
    """u = (h >> 8)·2^-24 in [0, 1), exact in fp32."""
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


def stream_table(seed: int, key: int, model: int) -> tuple[int, int, int]:
    """(k0, mix32(k1), k1) of the (seed, key, model) stream, host side."""
    k0, k1 = rng.stream_keys(seed, key, model)
    return k0, rng.mix32(k1), k1


def scalar_threshold(p: float) -> int | None:
    """The integer test of ``u < fp32(p)``: keep iff h < this (``rng.keep_mask``'s scalar path); None
    when fp32(p) ≥ 1 (every element kept: the threshold 2^32 does not fit a uint32)."""
    pf = rng.fp32(float(p))
    if pf >= 1:
        return None
    return math.ceil(pf * 2**24) * 256 if pf > 0 else 0
