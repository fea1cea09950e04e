"""Counter-based random numbers for the random sparsifiers (DARE, DELLA): the cross-backend contract.

Every random keep decision is a pure function of (``seed``, ``key`` = stable hash of the tensor name,
``model`` = the input's index among the non-base models, ``i`` = the element's index in the flattened
tensor). No state is carried from one tensor or one element to the next, so torch, C++ (``uint32_t``)
and Triton (``tl.uint32``) give the same mask for one seed, whatever the tensor order, the chunking,
the threading or the device. Only 32-bit unsigned arithmetic is used: ``*`` modulo 2^32, ``^`` and
logical ``>>``.

THE ALGORITHM (all values unsigned 32-bit; ``M = 0xFFFFFFFF``)::

    mix32(x):                              # "lowbias32" (C. Wellons, hash-prospector): a bijection
        x ^= x >> 16;  x = (x * 0x7FEB352D) & M
        x ^= x >> 15;  x = (x * 0x846CA68B) & M
        x ^= x >> 16;  return x

    stream keys, once per (seed, key, model); seed taken modulo 2^64, key < 2^63, model < 2^32:
        s = 0x243F6A88
        for w in (seed & M, seed >> 32 & M, key & M, key >> 32 & M, model):
            s = mix32(s ^ w)
        k0 = s
        k1 = mix32(s ^ 0x9E3779B9)

    element i (0 <= i < 2^64; lo = i & M, hi = i >> 32):
        h = mix32(mix32(lo ^ k0) ^ mix32(k1 ^ hi))

    uniform:  u = (h >> 8) * 2^-24          # 24 random bits: exact in fp32, u in [0, 1)
    keep:     u < p                         # p rounded to fp32 first (``fp32(p)``)

``u < p`` is the same test as ``h < ceil(p * 2^24) * 256`` (p·2^24 is exact for an fp32 p; ``h >> 8 < T``
iff ``h < 256·T`` for an integer T), which is what the scalar-``p`` path below computes. Porting notes:
C++ ``uint32_t`` arithmetic wraps as above; in Triton use ``tl.uint32`` (``>>`` is logical on
unsigned types). ``tests/methods/test_rng.py`` holds a table of the first outputs for (seed=0, key=1,
model=0) and a few more, computed there by independent pure-Python integer code.

Why two rounds: a single ``mix32`` of consecutive counters is a weak mixer (avalanche bias ~0.17 by
hash-prospector's measure); two rounds with a key between them cost ~10 integer ops per element.
Measured on 20 streams of 2^20 outputs: the 32 bit frequencies, lag 1-256 autocorrelations and
cross-stream (seed, model) correlations were all within sampling error (640 + 140 z-scores, sd 1.01,
max |z| 3.4); ``test_rng.py`` keeps lighter versions of these checks.

Speed: torch has no ``uint32`` shifts, so the torch path holds the values in int64 tensors (always
< 2^32 after the ``& M``; int64 multiplication wraps modulo 2^64, so the low 32 bits of a product are
exact) and works in-place on 16 Ki-element chunks that stay in L1/L2 cache: a 4096x1024 mask takes
~30-50 ms on one core, against ~0.5 s for the same expression on whole-tensor temporaries. The chunk
is below torch's 32 Ki parallel grain size on purpose: every op then runs on the calling thread. With
64 Ki chunks each of the ~20 ops per chunk was split over 2 OpenMP threads, and on the loaded 2-core
machine those hand-offs made one mask take 0.2-3.5 s instead of 50 ms.
"""

from __future__ import annotations

import math
from typing import Sequence

from .._lazy import torch

M32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
STREAM_INIT = 0x243F6A88
K1_TWEAK = 0x9E3779B9
#: elements per in-place chunk: 16 Ki int64 = 128 KiB per buffer; < torch's 32 Ki grain size (see above)
CHUNK = 1 << 14


def mix32(x: int) -> int:
    """lowbias32 on one Python int (a bijection of [0, 2^32))."""
    x &= M32
    x ^= x >> 16
    x = (x * MUL1) & M32
    x ^= x >> 15
    x = (x * MUL2) & M32
    x ^= x >> 16
    return x


def stream_keys(seed: int, key: int, model: int) -> tuple[int, int]:
    """(k0, k1) of the (seed, key, model) stream; see the module docstring."""
    seed &= (1 << 64) - 1
    if key < 0 or key >= 1 << 64:
        raise ValueError(f"key must be in [0, 2^64), got {key}")
    if model < 0 or model > M32:
        raise ValueError(f"model index must be in [0, 2^32), got {model}")
    s = STREAM_INIT
    for w in (seed & M32, seed >> 32, key & M32, key >> 32, model):
        s = mix32(s ^ w)
    return s, mix32(s ^ K1_TWEAK)


def _mix_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """mix32 in place on an int64 tensor of values < 2^32 (``tmp``: a scratch buffer of the same size)."""
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(MUL1).bitwise_and_(M32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(MUL2).bitwise_and_(M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    return x


def _chunks(start: int, numel: int):
    """(offset in the output, first lo counter, count, hi word): never crossing a 2^32 boundary of i."""
    off = 0
    while off < numel:
        i = start + off
        lo, hi = i & M32, i >> 32
        n = min(CHUNK, numel - off, (1 << 32) - lo)
        yield off, lo, n, hi
        off += n


def _fill_hash(buf: torch.Tensor, tmp: torch.Tensor, lo: int, hi: int, k0: int, k1: int) -> torch.Tensor:
    torch.arange(lo, lo + buf.numel(), out=buf)
    buf.bitwise_xor_(k0)
    _mix_(buf, tmp)
    buf.bitwise_xor_(mix32(k1 ^ hi))
    return _mix_(buf, tmp)


def hash_u32(seed: int, key: int, model: int, numel: int, start: int = 0) -> torch.Tensor:
    """The raw 32-bit outputs h of elements ``start .. start+numel-1`` (int64 tensor, values < 2^32)."""
    k0, k1 = stream_keys(seed, key, model)
    out = torch.empty(numel, dtype=torch.int64)
    tmp = torch.empty(min(CHUNK, max(numel, 1)), dtype=torch.int64)
    for off, lo, n, hi in _chunks(start, numel):
        _fill_hash(out[off:off + n], tmp[:n], lo, hi, k0, k1)
    return out


def uniform(seed: int, key: int, model: int, numel: int, start: int = 0) -> torch.Tensor:
    """u = (h >> 8)·2^-24 of elements ``start .. start+numel-1`` (fp32, exact, in [0, 1))."""
    return (hash_u32(seed, key, model, numel, start) >> 8).to(torch.float32).mul_(2.0**-24)


def fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (returned as a Python float)."""
    return float(torch.tensor(x, dtype=torch.float32))


def keep_mask(
    seed: int, key: int, model: int, p: float | torch.Tensor, shape: Sequence[int] | int, start: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bernoulli keep mask: element i kept iff u_i < fp32(p) (``p``: a float, or a tensor of
    probabilities with ``shape``'s number of elements, compared element by element in fp32). Returns a
    bool tensor of ``shape`` covering elements ``start ..``, generated on the CPU and moved to ``device``
    (default: ``p``'s device, else the CPU): this torch path is the reference, GPU kernels port it."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=torch.bool)
    k0, k1 = stream_keys(seed, key, model)
    buf = torch.empty(min(CHUNK, max(numel, 1)), dtype=torch.int64)
    tmp = torch.empty_like(buf)
    if isinstance(p, torch.Tensor):
        pf = p.reshape(-1)
        if pf.numel() != numel:
            raise ValueError(f"p has {pf.numel()} elements, shape {list(shape)} has {numel}")
        if device is None:
            device = p.device
        pf = pf.to("cpu", torch.float32)
        u = torch.empty(buf.numel(), dtype=torch.float32)
        for off, lo, n, hi in _chunks(start, numel):
            h = _fill_hash(buf[:n], tmp[:n], lo, hi, k0, k1)
            h.bitwise_right_shift_(8)
            torch.mul(h, 2.0**-24, out=u[:n])  # exact: a 24-bit integer times a power of two
            torch.lt(u[:n], pf[off:off + n], out=out[off:off + n])
    else:
        # u < p  <=>  h < ceil(p·2^24)·256 (see the module docstring); p ≥ 1 keeps all, p ≤ 0 none
        threshold = math.ceil(fp32(float(p)) * 2**24) * 256
        for off, lo, n, hi in _chunks(start, numel):
            h = _fill_hash(buf[:n], tmp[:n], lo, hi, k0, k1)
            torch.lt(h, threshold, out=out[off:off + n])
    out = out.reshape(shape)
    return out if device is None else out.to(device)
