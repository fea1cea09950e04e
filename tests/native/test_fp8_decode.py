"""The FP8 load step's decoders (csrc/cpu/fp8.cpp), bit for bit against the torch reference (``io.fp8.dequantize``):
the F16C one (an fp16 bit pattern per byte, widened by vcvtph2ps; e4m3fn's value / 256 times 256 · scale) and
the select one (``fp8_decode``; CPUs without F16C, ``FASTMERGE_FP8_DECODER=select``, and the F16C path's short
tails and unfoldable scales).

Every code of both formats times scales that stress the fold of 256 into the scale (subnormal, 2^-126, the
largest folded one 2^120 - ulp, 2^120 itself and above, FLT_MAX, inf, NaN, signed zeros, negatives), per
tensor, per row and per block; runs of every length 1-40 (the 16- and 8-wide steps and the scalar tail) from
byte addresses at every offset mod 16; and the linear, ties and dare kernels on such inputs against the same
kernels on the reference's fp32 copies, outputs poisoned with a NaN no kernel writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastmerge import _native
from fastmerge.backends.base import MergeJob
from fastmerge.backends.native import NativeBackend
from fastmerge.io import fp8
from fastmerge.methods import get_method
from test_fp8_native import E4, E5, params, source

pytestmark = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason="fastmerge._C not built")

#: fp32 bit patterns of the scales
SCALE_BITS = [
    0x00000001, 0x00000100, 0x007FFFFF, 0x00800000, 0x01000000,  # subnormals, 2^-126: 256 s exact, v · s underflows
    0x3B800000, 0x3DCCCCCD, 0x3F800000, 0x3F8CCCCD, 0x43E00000,  # 2^-8, 0.1, 1, 1.1, 448
    0x39E38E39, 0x3F7FFFFF, 0x4B7FFFFF,                          # 1/3584 (amax / 448 style), odd mantissas
    0x7B7FFFFF, 0x7B800000, 0x7BFFFFFF, 0x7F7FFFFF,              # largest folded scale, 2^120 (256 s = inf), FLT_MAX
    0x7F800000, 0xFF800000, 0x00000000, 0x80000000,              # +-inf, +-0
    0xBF800000, 0x80000001, 0xFB7FFFFF, 0xC2F6E979,              # negatives
]
NAN_SCALE_BITS = [0x7FC00000, 0xFFC12345, 0x7FA00001]  # quiet, negative with payload, signalling
POISON = 0x7FBADBAD  # a signalling NaN: no decode or arithmetic writes it (results are quieted)
POISON_BF16 = 0x7FA1  # likewise (the kernels' bf16 narrowing writes 0xFFFF for every NaN)


def fbits(x: list[int]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int64).to(torch.int32).view(torch.float32)


def ibits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t.contiguous().view(torch.int16)


def poisoned(shape, dtype=torch.float32) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.full(shape, POISON, dtype=torch.int32).view(torch.float32)
    return torch.full(shape, POISON_BF16, dtype=torch.int16).view(torch.bfloat16)


def unwritten(out: torch.Tensor) -> int:
    return int((ibits(out) == (POISON if out.dtype == torch.float32 else POISON_BF16)).sum())


def load(src: _native.Fp8Source, shape) -> torch.Tensor:
    """The load step's output: nearswap's clamp to [0 - inf, 0 + inf] writes x itself (bits kept, -0 and NaN too)."""
    out = poisoned(shape)
    _native.nearswap(out, src, torch.zeros(shape), float("inf"))
    assert unwritten(out) == 0, "the load step left elements unwritten"
    return out


def mismatches(got: torch.Tensor, want: torch.Tensor) -> str:
    bad = (ibits(got) != ibits(want)).nonzero()
    return f"{len(bad)} differ, first {bad[:4].tolist()}: " + ", ".join(
        f"{int(ibits(got)[tuple(i)]) & 0xFFFFFFFF:#010x} vs {int(ibits(want)[tuple(i)]) & 0xFFFFFFFF:#010x}" for i in bad[:4])


def all_codes(fmt, scale_bits: list[int], kind: str):
    """Every code of ``fmt`` under every scale: (source, torch reference, shape). channel: row i = the 256 codes
    with scale i; block (1, 64): each row's four 64-column blocks get four scales (the list rotated)."""
    S = len(scale_bits)
    q = torch.arange(256, dtype=torch.uint8).repeat(S, 1).view(fmt)
    if kind == "channel":
        s = fbits(scale_bits).reshape(S, 1)
        return source(q, s, "channel"), fp8.dequantize(q, s, "channel"), q.shape
    rot = [scale_bits[(i + k * 7) % S] for i in range(S) for k in range(4)]
    s = fbits(rot).reshape(S, 4)
    return source(q, s, "block", (1, 64)), fp8.dequantize(q, s, "block", (1, 64)), q.shape


@pytest.mark.parametrize("kind", ["channel", "block"])
@pytest.mark.parametrize("fmt", [E4, E5], ids=["e4m3fn", "e5m2"])
def test_every_code_times_every_scale(fmt, kind):
    src, ref, shape = all_codes(fmt, SCALE_BITS, kind)
    got = load(src, shape)
    assert torch.equal(ibits(got), ibits(ref)), mismatches(got, ref)


@pytest.mark.parametrize("fmt", [E4, E5], ids=["e4m3fn", "e5m2"])
def test_every_code_per_tensor_scale(fmt):
    q = torch.arange(256, dtype=torch.uint8).repeat(3).view(fmt)  # 768: 48 16-wide steps, one run
    for b in SCALE_BITS:
        s = fbits([b])
        got = load(source(q, s, "tensor"), q.shape)
        ref = fp8.dequantize(q, s, "tensor")
        assert torch.equal(ibits(got), ibits(ref)), f"scale {b:#010x}: " + mismatches(got, ref)


@pytest.mark.parametrize("fmt", [E4, E5], ids=["e4m3fn", "e5m2"])
def test_nan_scales(fmt):
    """A NaN scale makes every element NaN (the reference's NaN · NaN payload depends on its operand order, so
    NaN-ness is what is compared here; the two decoders agree bit for bit, test_decoders_agree)."""
    src, ref, shape = all_codes(fmt, NAN_SCALE_BITS + [0x3F800000], "channel")
    got = load(src, shape)
    assert torch.equal(got[:3].isnan(), ref[:3].isnan()) and bool(got[:3].isnan().all())
    assert torch.equal(ibits(got[3:]), ibits(ref[3:]))


@pytest.mark.parametrize("fmt", [E4, E5], ids=["e4m3fn", "e5m2"])
def test_run_lengths_and_unaligned_bytes(fmt):
    """Per-row runs of every length 1-40 and a few longer (the 16-wide loop, the 8-wide step, the scalar tail),
    each read from byte addresses at every offset mod 16; random codes (NaN included), random and extreme
    per-row scales."""
    g = torch.Generator().manual_seed(7)
    buf = torch.randint(0, 256, (64 * 300 + 64,), generator=g, dtype=torch.uint8)
    extreme = fbits(SCALE_BITS)
    for cols in list(range(1, 41)) + [47, 63, 127, 129, 200]:
        rows = 11
        for start in range(16):
            q = buf[start:start + rows * cols].view(fmt).reshape(rows, cols)
            assert q.data_ptr() % 16 == (buf.data_ptr() + start) % 16
            s = torch.where(torch.rand(rows, 1, generator=g) < 0.5, torch.rand(rows, 1, generator=g) + 0.01,
                            extreme[torch.randint(0, len(extreme), (rows, 1), generator=g)])
            got = load(source(q, s, "channel"), q.shape)
            ref = fp8.dequantize(q, s, "channel")
            assert torch.equal(ibits(got), ibits(ref)), f"cols {cols}, start {start}: " + mismatches(got, ref)


@pytest.mark.parametrize("block", [(1, 7), (3, 24), (5, 33), (128, 128), (2, 1)])
@pytest.mark.parametrize("fmt", [E4, E5], ids=["e4m3fn", "e5m2"])
def test_block_runs(fmt, block):
    """Block scales whose runs end mid-vector (7, 24, 33 columns; partial last blocks of 203 columns), over
    several 1024-element load blocks (runs cut by the load block's end too)."""
    g = torch.Generator().manual_seed(block[0] * 100 + block[1])
    shape = (37, 203)
    q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(fmt)
    R, C = -(-shape[0] // block[0]), -(-shape[1] // block[1])
    extreme = fbits(SCALE_BITS)
    s = torch.where(torch.rand(R, C, generator=g) < 0.7, torch.rand(R, C, generator=g) * 1e-3,
                    extreme[torch.randint(0, len(extreme), (R, C), generator=g)])
    got = load(source(q, s, "block", block), shape)
    ref = fp8.dequantize(q, s, "block", block)
    assert torch.equal(ibits(got), ibits(ref)), mismatches(got, ref)


CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_fp8_decode import all_codes, load, ibits, SCALE_BITS, NAN_SCALE_BITS, E4, E5
out = {}
for name, fmt in (("e4m3fn", E4), ("e5m2", E5)):
    for kind in ("channel", "block"):
        src, ref, shape = all_codes(fmt, SCALE_BITS + NAN_SCALE_BITS, kind)
        out[f"{name}-{kind}"] = ibits(load(src, shape)).flatten().tolist()
print(json.dumps(out))
"""


def test_decoders_agree(tmp_path):
    """The select decoder (a fresh interpreter with FASTMERGE_FP8_DECODER=select) and the default one (F16C on
    a CPU with it) write the same bits for every code and scale, NaN scales included."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FASTMERGE_FP8_DECODER="select")
    r = subprocess.run([sys.executable, "-c", CHILD, here], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    child = json.loads(r.stdout)
    for name, fmt in (("e4m3fn", E4), ("e5m2", E5)):
        for kind in ("channel", "block"):
            src, ref, shape = all_codes(fmt, SCALE_BITS + NAN_SCALE_BITS, kind)
            got = ibits(load(src, shape)).flatten()
            sel = torch.tensor(child[f"{name}-{kind}"], dtype=torch.int32)
            assert torch.equal(got, sel), f"{name} {kind}: {int((got != sel).sum())} elements differ between the decoders"


KERNELS = {
    "linear": {"weight": [0.3, 0.5, -0.2]},
    "ties": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.2, 1.0]},
    "dare_ties": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.2, 1.0]},
    "dare_linear": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.9, 0.3], "rescale": False},
}


def fp8_case(shape, fmt, kind, block, seed):
    """An FP8 input with moderate codes (no NaN/inf bytes: the selections rank finite values) and scales that
    include subnormal ones and the largest folded one; (source, reference fp32 copy)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    q = torch.where((q & 0x7F) >= 0x70, q & 0xBF, q).view(fmt)
    n = {"channel": shape[0], "tensor": 1}.get(kind) or (-(-shape[0] // block[0]) * -(-shape[1] // block[1]))
    s = torch.rand(n, generator=g) * 1e-2 + 1e-4
    s[::5] = fbits([0x00012345])  # subnormal scales: products underflow to subnormals and zeros
    s[1::7] = 3.0e36  # 256 s still finite; v · s up to 1.3e39 overflows to inf in some elements
    s = s.reshape(-1, 1) if kind == "channel" else s.reshape(-(-shape[0] // block[0]), -1) if kind == "block" else s
    blk = block if kind == "block" else None
    return source(q, s, kind, block), fp8.dequantize(q, s, kind, blk)


def run_kernel(method, p, inputs, base, shape, out_dtype) -> torch.Tensor:
    out = poisoned(shape, out_dtype)
    NativeBackend().run_raw(MergeJob("t", get_method(method), p, False), out, inputs, base, 2, shape=shape)
    assert unwritten(out) == 0, f"{method}: unwritten elements"
    return out


@pytest.mark.parametrize("method", sorted(KERNELS))
@pytest.mark.parametrize("fmt", [E4, E5], ids=["e4m3fn", "e5m2"])
def test_kernels_on_fp8_equal_kernels_on_copies(method, fmt):
    shape = (37, 203)  # runs of 203 or 24 columns: every load block ends in 8-wide steps and scalar tails
    cases = [fp8_case(shape, fmt, kind, (3, 24), seed=21 + i) for i, kind in enumerate(("block", "channel", "tensor"))]
    base = fp8_case(shape, E4, "block", (3, 24), seed=40)
    p = params(method, 3, **KERNELS[method])
    for out_dtype in (torch.float32, torch.bfloat16):
        got = run_kernel(method, p, [c[0] for c in cases], None if method == "linear" else base[0], shape, out_dtype)
        want = run_kernel(method, p, [c[1] for c in cases], None if method == "linear" else base[1], shape, out_dtype)
        assert torch.equal(ibits(got), ibits(want)), f"{method} {out_dtype}: " + mismatches(got.float(), want.float())
