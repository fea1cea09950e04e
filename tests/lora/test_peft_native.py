"""fastmerge.lora.merge_utils's native merge step (csrc/cpu/peft_ties.cpp) against the torch code it replaces
(``USE_NATIVE = False``, the reference) and against PEFT's own functions: bit for bit (``torch.equal`` on the
bit patterns), for PEFT's TIES (total / frequency), magnitude_prune, their index-ties forms, and the merge
step of dare_*/task_arithmetic."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastmerge import _native
from fastmerge.lora import merge_utils as mu

pytestmark = pytest.mark.skipif(not _native.HAS_CPU_EXT or mu._torch_float_lanes() is None,
                                reason="needs fastmerge._C and an x86-64 torch")


def _torch_ref(fn, *args, **kw):
    old = mu.USE_NATIVE
    mu.USE_NATIVE = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kw)
    finally:
        mu.USE_NATIVE = old


def _run(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    # NaN payloads are not a contract (torch's own kernels write different ones); NaN-ness and every other bit are
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(_bits(a)[~nan], _bits(b)[~nan]), f"{int((_bits(a) != _bits(b)).sum())} elements differ"


FNS = {
    "ties": lambda xs, w, d: mu.ties(xs, w, d),
    "ties_frequency": lambda xs, w, d: mu.ties(xs, w, d, majority_sign_method="frequency"),
    "ties_index": lambda xs, w, d: mu.ties_index_ties(xs, w, d),
    "magnitude_prune": lambda xs, w, d: mu.magnitude_prune(xs, w, d),
    "magnitude_prune_index": lambda xs, w, d: mu.magnitude_prune_index_ties(xs, w, d),
}


def _inputs(n, k, dtype, gen, kind):
    xs = []
    for i in range(k):
        if kind == "levels":  # few distinct magnitudes: ties at every threshold
            x = (torch.randint(-3, 4, (n,), generator=gen) * 0.25).float()
        else:
            x = torch.randn(n, generator=gen) * 10.0 ** (i % 3 - 1)
        xs.append(x.to(dtype))
    if kind == "nonfinite" and n >= 7:
        xs[0][1] = float("nan")
        xs[-1][3] = float("inf")
        xs[k // 2][5] = -float("inf")
        xs[0][6] = float("nan")
    return xs


# NaN, and ties under PEFT's topk rule, send tensors to topk in both paths (slow): above 5,000 elements only the
# cases that do not (fp32 "levels" keeps a tensor above 2^16 elements, whose tie cut is found by a separate scan)
_CASES = [(dtype, n, k, kind) for dtype in (torch.float32, torch.bfloat16, torch.float16)
          for n, k in ((2, 3), (7, 1), (7, 9), (1000, 5), (4099, 8), (70001, 4), (70001, 9))
          for kind in ("randn", "levels", "nonfinite")
          if n <= 5000 or not (kind == "nonfinite" or (kind == "levels" and dtype != torch.float32))]


@pytest.mark.parametrize("dtype,n,k,kind", _CASES)
def test_native_equals_torch_path(dtype, n, k, kind):
    gen = torch.Generator().manual_seed(n * 31 + k)
    xs = _inputs(n, k, dtype, gen, kind)
    w = torch.randn(k, generator=gen)
    w[0] = 0.0
    if k > 2:
        w[1] = -1.5
    for d in (0.1, 0.5, 0.9, 1.0):
        for name, fn in FNS.items():
            _same(_run(fn, xs, w, d), _torch_ref(fn, xs, w, d))


def test_large_and_thread_counts():
    """1,000,003 elements (not a multiple of any vector width) with K = 2..16 under several torch thread
    counts: torch's column chunks, and with them the elements summed in its interleaved order, move."""
    gen = torch.Generator().manual_seed(3)
    n = 1_000_003
    base = [torch.randn(n, generator=gen) * 10.0 ** (i % 5 - 2) for i in range(16)]
    old = torch.get_num_threads()
    try:
        for threads, k in ((1, 16), (2, 8), (3, 9), (4, 5), (2, 2)):
            torch.set_num_threads(threads)
            xs = base[:k]
            w = torch.linspace(-1.0, 2.0, k)
            for name in ("ties", "ties_index", "magnitude_prune_index"):
                _same(_run(FNS[name], xs, w, 0.5), _torch_ref(FNS[name], xs, w, 0.5))
    finally:
        torch.set_num_threads(old)


def test_interleaved_order_ranges_matter():
    """Without the interleaved-order fix-up the tail elements of torch's chunks differ: the ranges are real."""
    gen = torch.Generator().manual_seed(5)
    n, k = 100_003, 8
    xs = [torch.randn(n, generator=gen) * 10.0 ** (i % 7 - 3) for i in range(k)]
    w = torch.ones(k)
    ref = _torch_ref(mu.task_arithmetic, xs, w)
    ranges = mu._torch_sum_ilp_ranges(n, k, 4, mu._torch_float_lanes(), torch.get_num_threads())
    assert ranges  # 100003 is not a multiple of 32: every chunking leaves a tail
    out = torch.empty(n)
    _native.peft_merge(out, xs, [mu._KEEP_ALL] * k, w.tolist(), "weighted_sum", [], [])
    assert not torch.equal(out, ref)
    _native.peft_merge(out, xs, [mu._KEEP_ALL] * k, w.tolist(), "weighted_sum", [], ranges)
    assert torch.equal(out, ref)


def test_bf16_majority_sum_in_fp32():
    """torch sums bf16 in fp32 (1 − 2^-9 − 1 < 0; summed in bf16 it would be 0, +1): the elected sign follows."""
    x = [torch.full((64,), v, dtype=torch.bfloat16) for v in (1.0, -(2.0 ** -9), -1.0)]
    w = torch.tensor([1.0, 1.0, 1.0])
    out = _run(mu.ties, x, w, 1.0)
    _same(out, _torch_ref(mu.ties, x, w, 1.0))
    assert torch.all(out == (-(2.0 ** -9) - 1.0) / 2)  # the two negative entries agree with the elected −1


def test_poisoned_output_is_fully_written():
    gen = torch.Generator().manual_seed(7)
    for n in (2, 1023, 1025, 70001):
        xs = [torch.randn(n, generator=gen) for _ in range(6)]
        for mode in ("total", "frequency", "weighted_sum"):
            out = torch.full((n,), float("nan"))
            _native.peft_merge(out, xs, [(0.5, n, False)] * 6, [0.5] * 6, mode)
            assert not torch.isnan(out).any()


def test_ties_index_cut_keeps_first_ties():
    """topk_ties=False: the first tied elements by index are kept, exactly k in all."""
    x = torch.tensor([1.0, 2.0, 2.0, -2.0, 2.0, 3.0, 0.5, 2.0])
    rules = _native.peft_prune_rules([x], 4, index_ties=True)  # 3, then three of the five 2's
    assert rules == [(2.0, 3, 0)]
    assert _native.peft_prune_rules([x], 4, index_ties=False)[0][2] == 1  # topk decides
    out = mu.magnitude_prune_index_ties([x], [1.0], 0.5)
    assert out.tolist() == [0.0, 2.0, 2.0, -2.0, 0.0, 3.0, 0.0, 0.0]
    _same(out, _torch_ref(mu.magnitude_prune_index_ties, [x], [1.0], 0.5))


def test_native_kernel_is_used(monkeypatch):
    """The native path really runs: a stub in its place changes the result."""
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(5000, generator=gen) for _ in range(4)]
    w = torch.tensor([0.5, 1.0, -0.25, 2.0])
    calls = []
    monkeypatch.setattr(_native, "peft_merge", lambda out, *a, **k: (calls.append(1), out.fill_(7.0)))
    for fn in FNS.values():
        assert torch.all(_run(fn, xs, w, 0.5) == 7.0)
    assert torch.all(mu.task_arithmetic(xs, w) == 7.0)
    assert len(calls) == len(FNS) + 1


def test_fallbacks_keep_torch_semantics():
    """Inputs the kernel does not take run the torch code: non-contiguous, fp64, >16 tensors, fp64 weights."""
    gen = torch.Generator().manual_seed(13)
    xs = [torch.randn(64, 32, generator=gen) for _ in range(3)]
    w = torch.tensor([1.0, 0.5, -1.0])
    assert mu._native_weights(xs, w) is not None
    assert mu._native_weights([x.T for x in xs], w) is None
    assert mu._native_weights([x.double() for x in xs], w) is None
    assert mu._native_weights(xs * 6, torch.ones(18)) is None
    assert mu._native_weights(xs, w.double()) is None
    _same(_run(mu.ties, [x.T for x in xs], w, 0.5), _torch_ref(mu.ties, [x.T for x in xs], w, 0.5))
    with pytest.raises(ValueError, match="Density"):
        mu.ties(xs, w, -0.1)
    with pytest.raises(RuntimeError, match="Unimplemented mask method"):
        mu.ties(xs, w, 0.5, majority_sign_method="median")
    with pytest.warns(UserWarning, match="no pruning"):
        mu.ties(xs, w, 1.0)


def test_dare_and_task_arithmetic_merge_step():
    """dare_*: PEFT's bernoulli masks stay in torch, the merge step of the pruned tensors is native."""
    gen = torch.Generator().manual_seed(17)
    xs = [torch.randn(3001, generator=gen).to(torch.bfloat16) for _ in range(5)]
    w = torch.tensor([0.2, -0.7, 1.1, 0.0, 0.4])
    for fn in (lambda: mu.dare_ties(xs, w, 0.6), lambda: mu.dare_ties(xs, w, 0.6, "frequency"),
               lambda: mu.dare_linear(xs, w, 0.6), lambda: mu.task_arithmetic(xs, w)):
        torch.manual_seed(23)
        a = _run(fn)
        torch.manual_seed(23)
        _same(a, _torch_ref(fn))


def test_against_peft():
    peft_mu = pytest.importorskip("peft.utils.merge_utils")
    gen = torch.Generator().manual_seed(19)
    for n, k, dtype in ((7, 3, torch.float32), (70001, 9, torch.float32), (4099, 8, torch.bfloat16), (1000, 4, torch.float16)):
        xs = [torch.randn(n, generator=gen).to(dtype) for _ in range(k)]
        w = torch.linspace(-0.5, 1.5, k)
        for d in (0.1, 0.5, 0.9):
            _same(_run(mu.ties, xs, w, d), _run(peft_mu.ties, xs, w, d))
            _same(_run(mu.ties, xs, w, d, "frequency"), _run(peft_mu.ties, xs, w, d, "frequency"))
            _same(_run(mu.magnitude_prune, xs, w, d), _run(peft_mu.magnitude_prune, xs, w, d))
        _same(_run(mu.task_arithmetic, xs, w), _run(peft_mu.task_arithmetic, xs, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_torch_that_sums_in_another_order_gets_the_torch_code(monkeypatch, dtype):
    """The kernel's model of torch's summation order is checked once per (dtype, threads, vector width, torch)
    on probes: with the model broken (no interleaved tail columns, as a torch that summed every column in row
    order would need), the probe disagrees, one warning names it, and the merges run the torch code with its
    bits; with the model intact the probe agrees and the kernel runs."""
    gen = torch.Generator().manual_seed(21)
    xs = [torch.randn(3000, generator=gen).to(dtype) for _ in range(6)]
    w = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.25, 0.4])
    monkeypatch.setattr(mu, "_agreement", {})
    assert mu._agrees_with_torch(dtype) and mu._native_weights(xs, w) is not None
    monkeypatch.setattr(mu, "_agreement", {})
    monkeypatch.setattr(mu, "_torch_sum_ilp_ranges", lambda *a: [])
    with pytest.warns(UserWarning, match="summation order"):
        assert mu._native_weights(xs, w) is None
    assert mu._native_weights(xs, w) is None  # decided once: no second probe, no second warning
    calls = []
    monkeypatch.setattr(_native, "peft_merge", lambda *a, **k: calls.append(a))
    _same(_run(mu.ties, xs, w, 0.5), _torch_ref(mu.ties, xs, w, 0.5))
    assert calls == []
