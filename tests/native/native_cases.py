"""Shared inputs and checks of the tests of the sparsifying C++ kernels (test_native_{ties,dare,della,breadcrumbs}).

The torch references in ``fastmerge.methods`` are the specification. Every kernel output is compared with
``reference(...).to(out_dtype)`` bit for bit, with ``out`` poisoned (NaN) first so that an element the
kernel forgot to write cannot pass.

One documented departure: with ``rescale`` on, the reference's two L1 norms are torch fp32 ``abs().sum()``,
whose rounding depends on torch's thread count and SIMD width (on this machine ~half of 300k-element sums
differ between 1 and 2 torch threads, and ~2/3 are not the correctly rounded sum), while the kernels
round the (double-accumulated) norms once. ``exact_norms`` patches the reference to correctly rounded
norms, which makes the comparison bit-exact again; tolerance tests compare with the unpatched reference.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from fastmerge.backends.base import MergeJob
from fastmerge.backends.native import NativeBackend
from fastmerge.methods import get_method, gta

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def raw(t: torch.Tensor):
    """``t``'s bytes as a raw view (``io.reader.RawView``: what the torch-free engine hands the wrappers)."""
    from fastmerge.io.reader import RawView

    return RawView(t.data_ptr(), t.numel() * t.element_size(), str(t.dtype).split(".")[1], t.numel())
DTYPES = [F32, BF16, F16]
DT_ID = {F32: "f32", F16: "f16", BF16: "bf16"}
BIG = 2**20 + 3  # not a multiple of the 1024-element blocks, nor of any thread count's share

# per-model parameters, sliced to T models: mixed-sign weights (the sign election has work to do) and
# densities including 1.0 (kept whole) and a small one
WEIGHTS = (0.7, -0.4, 1.1, 0.35, -0.9)
DENSITIES = (0.5, 0.2, 1.0, 0.9, 0.05)


def make_case(shape, T: int, in_dtypes, base_dtype, seed: int, spread: float = 0.5):
    """base ~ N(0, 1) and T fine-tunes = base + N(0, spread²), each rounded to its dtype."""
    gen = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if isinstance(in_dtypes, torch.dtype):
        in_dtypes = [in_dtypes] * T
    b = torch.randn(shape, generator=gen)
    inputs = [(b + spread * torch.randn(shape, generator=gen)).to(dt) for dt in in_dtypes]
    return inputs, b.to(base_dtype)


def quantised_case(shape, T: int, seed: int):
    """bf16 base and inputs whose deltas are multiples of 0.25 in [-1, 1]: |δ| has 5 values, so every
    selection boundary is heavily tied, and every L1 norm is an exact fp32 sum (up to 2^22 elements)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    base = (torch.randint(-16, 16, shape, generator=gen) * 0.5 + 0.25).to(BF16)
    inputs = []
    for _ in range(T):
        q = torch.randint(-4, 5, shape, generator=gen) * 0.25
        x = (base.float() + q).to(BF16)
        assert torch.equal(x.float() - base.float(), q)
        inputs.append(x)
    return inputs, base


def poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.full(shape, float("nan"), dtype=dtype)


def run_native(method: str, params, inputs, base, out_dtype: torch.dtype, threads: int = 0) -> torch.Tensor:
    """The native backend's ``run`` (the engine's call) into a NaN-poisoned output of ``out_dtype``."""
    out = poisoned(inputs[0].shape, out_dtype)
    NativeBackend().run(MergeJob("t", get_method(method), params, False), out, inputs, base, threads)
    return out


def assert_equal_bits(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if torch.equal(out, expected):
        return
    both_nan = out.isnan() & expected.isnan()
    bad = ((out != expected) & ~both_nan).reshape(-1).nonzero().flatten()
    if bad.numel() == 0:
        return
    i = int(bad[0])
    o, e = out.reshape(-1), expected.reshape(-1)
    raise AssertionError(
        f"{what}: {bad.numel()} of {out.numel()} elements differ from the reference; first at flat [{i}]: "
        f"native {o[i].item()!r} vs reference {e[i].item()!r}"
    )


def check_bit_exact(method: str, params, inputs, base, out_dtype: torch.dtype, threads: int = 0) -> torch.Tensor:
    expected = get_method(method).reference(inputs, base, params).to(out_dtype)
    out = run_native(method, params, inputs, base, out_dtype, threads)
    assert_equal_bits(out, expected, f"{method} {tuple(inputs[0].shape)} -> {DT_ID[out_dtype]}")
    return out


def check_close(method: str, params, inputs, base, out_dtype: torch.dtype, min_equal: float = 0.999) -> None:
    """Against the unpatched reference (torch's fp32 norms): the rescale factor of each model may differ by a
    few fp32 ulp, so fp32 outputs agree to ~1e-6 relative and 16-bit outputs are equal but for rare
    elements one ulp apart (a product landing on the other side of a rounding boundary)."""
    ref = get_method(method).reference(inputs, base, params)
    out = run_native(method, params, inputs, base, out_dtype)
    if out_dtype == F32:
        torch.testing.assert_close(out, ref, rtol=4e-6, atol=1e-6)
        return
    expected = ref.to(out_dtype)
    equal = (out == expected).float().mean().item()
    assert equal >= min_equal, f"{method}: only {equal:.5f} of elements equal the reference"
    # one ulp of x is at most eps·|x| for a normal x
    fi = torch.finfo(out_dtype)
    diff = (out.float() - expected.float()).abs()
    bound = fi.eps * torch.maximum(out.float().abs(), expected.float().abs()) + fi.tiny
    assert bool((diff <= bound).all()), f"{method}: an element differs by more than one ulp"


def _l1_rescaled_exact(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """gta.l1_rescaled with correctly rounded fp32 norms (a float64 sum, rounded once)."""
    masked = torch.where(keep, delta, 0.0)
    before = torch.tensor(delta.double().abs().sum().item(), dtype=torch.float32)
    after = torch.tensor(masked.double().abs().sum().item(), dtype=torch.float32)
    if before < gta.RESCALE_EPS or after < gta.RESCALE_EPS:
        return masked
    return masked * (before / after)


@contextlib.contextmanager
def exact_norms():
    """The references rescale with correctly rounded norms while inside (see the module docstring)."""
    saved = gta.l1_rescaled
    gta.l1_rescaled = _l1_rescaled_exact
    try:
        yield
    finally:
        gta.l1_rescaled = saved


def outputs_for_threads(method: str, params, inputs, base, out_dtype: torch.dtype,
                        threads: Sequence[int] = (1, 2, 3)) -> list[torch.Tensor]:
    return [run_native(method, params, inputs, base, out_dtype, t) for t in threads]
