"""Shared inputs and checks of the Triton kernel tests (CPU: kernels interpreted, ``TRITON_INTERPRET=1``).

The interpreter runs every program one after another in Python (~40 ms per program on the 2-core
machine), so the shapes are tiny and the packed batches few: four segments of 1, 7, 33x17 and
3x4x25 elements (one element, a short row, an odd matrix, an N-D tensor), and one small-block case
per kernel so that a segment spans several programs and every tile edge is masked somewhere.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from fastmerge.methods import get_method

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1,), (7,), (33, 17), (3, 4, 25)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IV = {2: torch.int16, 4: torch.int32}
#: merge_tensors parameters of every method with a Triton kernel (test_triton_backend, test_triton_gpu)
METHOD_CASES = {
    "linear": dict(weight=[0.2, 0.5, 0.3]),
    "task_arithmetic": dict(weight=0.3, normalize=True, **{"lambda": 0.8}),
    "ties": dict(weight=[0.3, -0.2, 0.6], density=[0.5, 0.2, 1.0]),
    "dare_linear": dict(weight=0.3, density=0.5, rescale=False),
    "dare_ties": dict(weight=0.3, density=0.5, rescale=False),
    "breadcrumbs": dict(weight=0.3, density=0.5, gamma=0.05),
    "breadcrumbs_ties": dict(weight=0.3, density=0.5, gamma=0.05),
    "della": dict(weight=0.3, density=0.5, epsilon=0.1, rescale=False),
    "della_linear": dict(weight=0.3, density=0.5, epsilon=0.1, rescale=False),
    "slerp": dict(t=0.3),
    "model_stock": dict(),
}


def packed(dtype: torch.dtype, T: int = 3, shapes=SHAPES, seed: int = 0, scale: float = 0.01, tied: bool = True):
    """(x [T, N], base [N], Segments) on DEV: base ~ N(0, 1), models = base + N(0, scale²), rounded to
    ``dtype`` (never zeros); ``tied``: one model gets a run of equal |δ| (boundary ties for selection)."""
    from fastmerge.kernels._common import Segments

    g = torch.Generator().manual_seed(seed)
    numels = [math.prod(s) for s in shapes]
    n = sum(numels)
    base = torch.randn(n, generator=g)
    x = base[None] + scale * torch.randn(T, n, generator=g)
    if tied and n > 120:
        x[min(1, T - 1), 50:120] = base[50:120] + scale  # |δ| equal (to the rounding of x) over 70 entries
    return x.to(dtype).to(DEV), base.to(dtype).to(DEV), Segments.packed(numels, shapes=shapes)


def poisoned(n: int, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN: an element the kernel does not write fails every comparison."""
    return torch.full((n,), float("nan"), dtype=dtype, device=DEV)


def reference(method: str, x, base, segs, params, out_dtype):
    """The torch reference (CPU, the specification) per segment, concatenated, rounded once."""
    ref = get_method(method).reference
    outs = []
    for s, (a, n) in enumerate(zip(segs.start, segs.numel)):
        shape = segs.shapes[s] if segs.shapes else (n,)
        xs = [x[t, a:a + n].cpu().reshape(shape) for t in range(x.shape[0])]
        b = None if base is None else base[a:a + n].cpu().reshape(shape)
        outs.append(ref(xs, b, params[s]).to(out_dtype).reshape(-1))
    return torch.cat(outs)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
    a, b = got.view(IV[got.element_size()]), want.view(IV[want.element_size()])
    bad = (a != b).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()}/{a.numel()} elements differ; first at {i}: got {float(got[i])!r}, want {float(want[i])!r}"
        )


def assert_close_ulps(got: torch.Tensor, want: torch.Tensor, max_ulps: int, min_exact: float, what: str = "") -> None:
    """Every element within ``max_ulps`` ulps of the output dtype (counted on the bit patterns: same sign),
    and at least ``min_exact`` of them bit-equal."""
    got = got.cpu()
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (unwritten element?)"
    iv = IV[got.element_size()]
    a, b = got.view(iv).to(torch.int64), want.view(iv).to(torch.int64)
    d = (a - b).abs()
    assert int(d.max()) <= max_ulps, f"{what}: {int(d.max())} ulps apart at {int(d.argmax())}"
    exact = float((d == 0).float().mean())
    assert exact >= min_exact, f"{what}: only {exact:.4f} of the elements bit-equal"


def check_rescale(kernel, x, base, segs, keep_fn, method, params, dtype, max_ratio_ulps: int = 8) -> None:
    """The rescale path, split in its two parts:

    1. the kernel's L1 ratios ‖δ‖₁/‖k·δ‖₁ are within ``max_ratio_ulps`` fp32 ulps of the reference's
       (the reference sums in fp64 and rounds once; the kernel accumulates fp64 in its own block order);
    2. given the reference's own ratios, the fused pass reproduces the reference bit for bit.

    ``keep_fn(s, t, delta)``: the reference's keep mask of segment s, model t (None: kept whole)."""
    from fastmerge.methods.gta import RESCALE_EPS

    for j in range(kernel.n_passes):
        kernel.data_pass(j, x, base, segs)
        kernel.end_pass(j)
    T = x.shape[0]
    want = torch.ones((segs.count, T), dtype=torch.float32)
    for s, (a, n) in enumerate(zip(segs.start, segs.numel)):
        shape = segs.shapes[s] if segs.shapes else (n,)
        b = base[a:a + n].cpu().float().reshape(shape)
        for t in range(T):
            delta = x[t, a:a + n].cpu().float().reshape(shape) - b
            keep = keep_fn(s, t, delta)
            if keep is None:
                continue
            # as the reference (methods/gta.py l1_rescaled): fp64 sums, rounded once to fp32
            before = delta.abs().sum(dtype=torch.float64).to(torch.float32)
            after = torch.where(keep, delta, 0.0).abs().sum(dtype=torch.float64).to(torch.float32)
            if before >= RESCALE_EPS and after >= RESCALE_EPS:
                want[s, t] = before / after
    got = kernel.scale.cpu()
    gap = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert int(gap.max()) <= max_ratio_ulps, f"{method}: rescale ratios {int(gap.max())} ulps apart"
    kernel.scale = want.to(x.device)
    out = kernel.merge(x, base, poisoned(segs.total, dtype), segs)
    assert_bits_equal(out, reference(method, x, base, segs, params, dtype), f"{method} rescale, reference ratios")
