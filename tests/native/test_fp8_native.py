"""FP8 inputs read by the C++ kernels' load step (csrc/cpu/fp8.h): every native kernel on FP8 sources
(``_native.Fp8Source``: the FP8 bytes and their scales) is bit-identical to the same kernel on the torch
reference's fp32 dequantisation (``io.fp8.dequantize``) of the same inputs.

Odd shapes (partial last 128x128 blocks, rows not a multiple of 16, tensors over several 1024-element blocks),
both formats, every scale kind, NaN and inf encodings, mixed families (FP8 and bf16 inputs, FP8 or bf16 base),
outputs poisoned with NaN so that an unwritten element fails."""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.backends.base import MergeJob
from fastmerge.backends.native import NativeBackend
from fastmerge.io import fp8
from fastmerge.methods import get_method
from fastmerge.methods.base import ParamContext

pytestmark = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason="fastmerge._C not built")

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
BLOCK = (128, 128)


def source(q: torch.Tensor, scale: torch.Tensor | None, kind: str, block=BLOCK) -> _native.Fp8Source:
    s = None if scale is None else scale.to(torch.float32).contiguous()
    return _native.Fp8Source(q.view(torch.uint8).data_ptr(), q.numel(), str(q.dtype).split(".")[1], q.shape, kind,
                             0 if s is None else s.data_ptr(), 0 if s is None else s.numel(),
                             block if kind == "block" else None, keep=(q, s))


def fp8_input(shape, fmt, kind, seed, nan_codes=True):
    """(FP8 source, its fp32 dequantisation by the reference): random bytes (every code, NaN and inf included
    unless ``nan_codes`` is False) times scales of the kind."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if not nan_codes:  # magnitudes of moderate size: |code| below the top exponents
        q = torch.where((q & 0x7F) >= 0x70, q & 0xBF, q)
    q = q.view(fmt)
    r, c = shape[0], (q.numel() // shape[0])
    scale = {"block": lambda: torch.rand(-(-r // BLOCK[0]), -(-c // BLOCK[1]), generator=g) + 0.01,
             "channel": lambda: torch.rand(r, 1, generator=g) + 0.01,
             "tensor": lambda: torch.rand(1, generator=g) + 0.01,
             "none": lambda: None}[kind]()
    return source(q, scale, kind), fp8.dequantize(q, scale, kind, BLOCK if kind == "block" else None)


def params(method: str, T: int, **given):
    m = get_method(method)
    per_model, shared = {}, {}
    for spec in m.params:
        v = given.get(spec.name, spec.default)
        if spec.per_model:
            per_model[spec.name] = list(v) if isinstance(v, (list, tuple)) else [v] * T
        else:
            shared[spec.name] = v
    return m.make_params(per_model, shared, ParamContext("model.layers.0.mlp.down_proj.weight", 7))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


#: the output's poison: a NaN whose payload no kernel makes (arithmetic on NaN gives the quiet NaN or an input's
#: payload, and FP8 NaN codes decode to the quiet NaN), so an element both runs left unwritten is caught even where
#: the expected value is NaN itself (an ordinary NaN poison would compare equal there)
POISON = {torch.float32: 0x7FC0DEAD, torch.bfloat16: 0x7FDE, torch.float16: 0x7EAD}


def native(method, p, inputs, base, shape, out_dtype, threads=2):
    out = torch.empty(shape, dtype=out_dtype)
    bits(out).fill_(POISON[out_dtype])
    assert bool(out.isnan().all()) and unwritten(out) == out.numel()
    NativeBackend().run_raw(MergeJob("t", get_method(method), p, False), out, inputs, base, threads, shape=shape)
    return out


def unwritten(out: torch.Tensor) -> int:
    return int((bits(out) == POISON[out.dtype]).sum())


def assert_same(method, p, srcs, refs, base_src, base_ref, shape, out_dtype=torch.float32):
    got = native(method, p, srcs, base_src, shape, out_dtype)
    want = native(method, p, refs, base_ref, shape, out_dtype)
    assert unwritten(want) == 0, f"{method}: the run on fp32 copies left {unwritten(want)} elements unwritten"
    assert unwritten(got) == 0, f"{method}: the run on FP8 left {unwritten(got)} elements unwritten"
    same = bits(got) == bits(want)
    assert bool(same.all()), f"{method}: {int((~same).sum())} of {got.numel()} elements differ from the kernel on the fp32 copies"


# -- the table: every byte of both formats, as torch casts it ---------------------------------------


@pytest.mark.parametrize("fmt", [E4, E5])
def test_every_code_dequantises_as_torch(fmt):
    q = torch.arange(256, dtype=torch.uint8).view(fmt)
    out = torch.full((256,), 7.0)
    # nearswap's clamp to [0 − inf, 0 + inf] writes x itself (a sum 0 + x would turn −0 into +0)
    _native.nearswap(out, source(q, None, "none"), torch.zeros(256), float("inf"))
    ref = q.float()
    assert torch.equal(bits(out), bits(ref)), [hex(int(i)) for i in (bits(out) != bits(ref)).nonzero().flatten()[:8]]
    # NaN codes: e4m3fn 0x7F / 0xFF, e5m2 0x7D-0x7F / 0xFD-0xFF; e5m2 0x7C / 0xFC are +-inf
    nan = ref.isnan().nonzero().flatten().tolist()
    assert nan == ([0x7F, 0xFF] if fmt == E4 else [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF])


@pytest.mark.parametrize("kind", ["block", "channel", "tensor", "none"])
@pytest.mark.parametrize("fmt", [E4, E5])
def test_load_step_is_the_reference_dequantisation(kind, fmt):
    shape = (300, 200)  # 3 x 2 blocks, both last ones partial; 200 not a multiple of 16: chunks cross rows
    src, ref = fp8_input(shape, fmt, kind, seed=1)
    out = torch.full(shape, 7.0)
    _native.nearswap(out, src, torch.zeros(shape), float("inf"))
    assert torch.equal(bits(out), bits(ref))


# -- every kernel: FP8 sources vs the fp32 copies ---------------------------------------------------

METHODS = {
    "linear": {"weight": [0.3, 0.5, -0.2]},
    "task_arithmetic": {"weight": [0.7, -0.4, 1.1], "lambda": 0.9},
    "ties": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.2, 1.0]},
    "dare_ties": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.2, 1.0]},
    "dare_linear": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.9, 0.3], "rescale": False},
    "della": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.2, 0.9], "epsilon": 0.1},
    "breadcrumbs_ties": {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.8, 0.9], "gamma": 0.05},
    "sce": {"select_topk": 0.5},
    "nearswap": {"t": 0.01},
}


def _family(shape, kinds, fmts, base_kind, seed, nan_codes):
    srcs, refs = [], []
    for i, (kind, fmt) in enumerate(zip(kinds, fmts)):
        if kind == "bf16":
            x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) * 3).to(torch.bfloat16)
            srcs.append(x)
            refs.append(x)
        else:
            s, r = fp8_input(shape, fmt, kind, seed + i, nan_codes)
            srcs.append(s)
            refs.append(r)
    if base_kind == "bf16":
        b = (torch.randn(shape, generator=torch.Generator().manual_seed(seed + 99)) * 3).to(torch.bfloat16)
        return srcs, refs, b, b
    bs, br = fp8_input(shape, E4, base_kind, seed + 99, nan_codes)
    return srcs, refs, bs, br


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape,kinds,fmts,base_kind", [
    ((300, 200), ("block", "block", "block"), (E4, E4, E4), "block"),  # DeepSeek-V3 layout, partial blocks
    ((257, 131), ("block", "bf16", "channel"), (E5, None, E4), "bf16"),  # a mixed family, odd rows
    ((1030,), ("tensor", "none", "channel"), (E4, E5, E5), "tensor"),  # 1-D: over a 1024-element block
], ids=["block", "mixed", "1d"])
def test_kernel_on_fp8_equals_kernel_on_dequantised_copies(method, shape, kinds, fmts, base_kind):
    T = 1 if method == "nearswap" else 3
    srcs, refs, bs, br = _family(shape, kinds[:T], fmts[:T], base_kind, seed=11, nan_codes=False)
    base = None if method == "linear" else (bs, br)
    p = params(method, T, **{k: (v[:T] if isinstance(v, list) else v) for k, v in METHODS[method].items()})
    for out_dtype in (torch.float32, torch.bfloat16):
        assert_same(method, p, srcs, refs, base and base[0], base and base[1], shape, out_dtype)


@pytest.mark.parametrize("method", ["ties", "linear", "della", "breadcrumbs_ties"])
def test_nan_and_inf_codes(method):
    """Every byte value, NaN and inf encodings included, through the selection and the merge."""
    shape = (257, 136)
    srcs, refs, bs, br = _family(shape, ("block", "block", "channel"), (E4, E5, E5), "block", seed=3, nan_codes=True)
    assert any(r.isnan().any() for r in refs) and any(r.isinf().any() for r in refs)
    base = None if method == "linear" else (bs, br)
    p = params(method, 3, **METHODS[method])
    assert_same(method, p, srcs, refs, base and base[0], base and base[1], shape)


def test_ties_exact_k_and_rescale_on_fp8():
    shape = (384, 256)  # whole blocks, rows multiples of 16: the fused block's one-multiply chunks
    srcs, refs, bs, br = _family(shape, ("block",) * 3, (E4,) * 3, "block", seed=5, nan_codes=False)
    for extra in ({"selection": "topk"}, {"rescale": True}, {"election": "count"}):
        assert_same("ties", params("ties", 3, **METHODS["ties"], **extra), srcs, refs, bs, br, shape, torch.bfloat16)


def test_fp8_source_checks():
    q = torch.zeros(300, 200, dtype=E4)
    with pytest.raises(ValueError, match="need 6 values, got 4"):
        source(q, torch.ones(2, 2), "block")
    with pytest.raises(ValueError, match="need 300 values"):
        source(q, torch.ones(3), "channel")
    with pytest.raises(TypeError, match="format"):
        _native.Fp8Source(q.data_ptr(), q.numel(), "float8_e4m3fnuz", q.shape)
    out = torch.empty(300, 200)
    with pytest.raises(TypeError, match="input or a base only"):
        _native.weighted_delta_sum(source(q, None, "none"), [out], None, [1.0], None)
    # the binding refuses a pointer that is not a descriptor
    with pytest.raises(ValueError, match="not an FP8 source descriptor"):
        _native._C.weighted_delta_sum(out.data_ptr(), 0, out.numel(), [out.data_ptr()], [3], 0, 0, [1.0], 0.0, 1.0, 1)
