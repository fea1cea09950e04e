"""Per-tensor benchmark of the native C++ kernels against the torch references (the specification) for the
sparsifying methods: ties, dare_ties, della, breadcrumbs, on the same in-memory tensors, in one process.

native: ``NativeBackend().run(job, out, inputs, base, threads)``, the engine's call (``out`` allocated
once and reused, as the engine's buffers). torch: ``TorchBackend().run(...)``, i.e. ``method.reference``
in fp32 and one rounding into ``out``, what ``--backend torch`` runs. Default mode (fp32 math) for both.
Parameters: weight 0.33 and density 0.5 for every fine-tune, gamma 0.01 (breadcrumbs), epsilon 0.15
(della), each method's defaults otherwise (rescale on for dare/della, off for ties/breadcrumbs).

Inputs: base ~ N(0, 0.02²) and 3 fine-tunes = base + N(0, 0.002²), bf16 (the benchmark family's
statistics). Shapes: 4096x4096 and 32000x1024 with FASTMERGE_BENCH_FULL=1 (and timing on), 1024x1024
when timed without it, 64x48 in the CI smoke run (``--benchmark-disable``, 1 round). Rounds alternate
torch (pytest-benchmark's untimed ``setup``, timed here) and native (the benchmarked target), after one
untimed warm-up of each; the ratio is median(torch) / median(native), in
``benchmark.extra_info["speedup_vs_torch"]`` and in ``$FASTMERGE_BENCH_DIR/native.md``.

    pytest bench/bench_native.py --benchmark-disable                           # smoke (CI)
    FASTMERGE_BENCH_FULL=1 pytest bench/bench_native.py --benchmark-enable -s  # the full shapes (~3 min)
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
from benchlib import save_table
import torch

from fastmerge import _native
from fastmerge.backends.base import MergeJob
from fastmerge.backends.native import NativeBackend
from fastmerge.backends.torch_ref import TorchBackend
from fastmerge.benchmark.bytes import physical_bytes
from fastmerge.methods import get_method
from fastmerge.methods.base import ParamContext

SHAPES_FULL = [(4096, 4096), (32000, 1024)]
SHAPES_TIMED = [(1024, 1024)]
SHAPES_SMOKE = [(64, 48)]
ROUNDS_TIMED = 3
DTYPE = torch.bfloat16
T = 3
CASES = {
    "ties": {},
    "dare_ties": {},
    "della": {"epsilon": 0.15},
    "breadcrumbs": {"gamma": 0.01},
}
RESULTS: dict[str, dict] = {}

pytestmark = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason="fastmerge._C not built")


def shapes(config: pytest.Config) -> list[tuple[int, int]]:
    """The shapes of this run's mode (bench/conftest.py's smoke / timed / full rules)."""
    timed = not (config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False))
    if timed and os.environ.get("FASTMERGE_BENCH_FULL") == "1":
        return SHAPES_FULL
    return SHAPES_TIMED if timed else SHAPES_SMOKE


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", shapes(metafunc.config), ids=lambda s: "x".join(map(str, s)), scope="module")


_INPUTS: dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}


def inputs_for(shape: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """base + 3 fine-tunes of ``shape`` (made once per shape)."""
    if shape not in _INPUTS:
        _INPUTS.clear()  # one shape alive at a time (32000x1024: 4 x 65 MB)
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g) * 0.02
        fts = [(base + 0.002 * torch.randn(shape, generator=g)).to(DTYPE) for _ in range(T)]
        _INPUTS[shape] = (base.to(DTYPE), fts)
    return _INPUTS[shape]


def make_job(method: str, name: str) -> MergeJob:
    m = get_method(method)
    specs = {s.name: s for s in m.params}
    values = {"weight": 0.33, "density": 0.5, **CASES[method]}
    per_model = {s.name: [values.get(s.name, s.default)] * T for s in m.params if s.per_model}
    shared = {s.name: values.get(s.name, s.default) for s in m.params if not s.per_model}
    assert all(k in specs for k in values), values
    p = m.make_params(per_model, shared, ParamContext(name, seed=42))
    m.check(p, "bench")
    return MergeJob(name, m, p, False)


def write_table(machine: dict, bench_dir: Path) -> Path | None:
    if not RESULTS:
        return None
    lines = [
        "# Per-tensor merge: native C++ kernels vs the torch references (bench/bench_native.py)",
        "",
        f"{machine.get('date_utc')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
        f"torch threads {machine.get('torch_threads')}, native threads: OpenMP default",
        "",
        "| method | shape | native ms (median) | torch ms (median) | speed-up vs torch | native GB/s of input "
        "| native GB/s (physical minimum) | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS.values():
        lines.append(
            f"| {r['method']} | {'x'.join(map(str, r['shape']))} {r['dtype']} x{r['models']} | "
            f"{r['native_median_s'] * 1e3:.1f} | {r['torch_median_s'] * 1e3:.1f} | {r['speedup_vs_torch']:.1f}x | "
            f"{r['native_input_gbps']:.2f} | {r['native_physical_gbps']:.2f} | {r['rounds']} |"
        )
    return save_table(bench_dir, "native", lines, {"machine": machine, "results": RESULTS})



@pytest.mark.parametrize("method", list(CASES))
def test_native_vs_torch(benchmark, timed, method, shape):
    base, fts = inputs_for(shape)
    job = make_job(method, "model.layers.0.mlp.up_proj.weight")
    native, ref = NativeBackend(), TorchBackend()
    out_native = torch.empty(shape, dtype=DTYPE)
    out_torch = torch.empty(shape, dtype=DTYPE)
    nat_times: list[float] = []
    ref_times: list[float] = []

    def timed_native():
        t0 = time.perf_counter()
        native.run(job, out_native, fts, base, 0)
        nat_times.append(time.perf_counter() - t0)
        return out_native

    def timed_torch():  # pytest-benchmark's untimed setup, called before each native round
        t0 = time.perf_counter()
        ref.run(job, out_torch, fts, base, 0)
        ref_times.append(time.perf_counter() - t0)

    timed_torch()  # warm-ups (first-touch of the outputs, scratch growth), then the agreement check
    timed_native()
    equal = (out_native == out_torch).float().mean().item()
    # bit-exact but for the rescale's norms (dare/della: torch's fp32 sums; see tests/native/native_cases.py)
    assert equal >= (1.0 if method in ("ties", "breadcrumbs") else 0.999), (method, equal)
    nat_times.clear()
    ref_times.clear()
    rounds = ROUNDS_TIMED if timed else 1
    benchmark.pedantic(timed_native, setup=timed_torch, rounds=rounds, iterations=1, warmup_rounds=0)
    if not ref_times:  # --benchmark-disable runs the target once without its setup
        timed_torch()
    if not nat_times:
        timed_native()
    nat, tor = statistics.median(nat_times), statistics.median(ref_times)
    in_bytes = (T + 1) * base.numel() * base.element_size()
    res = {
        "method": method, "shape": list(shape), "dtype": str(DTYPE).removeprefix("torch."), "models": T,
        "params": {"weight": 0.33, "density": 0.5, **CASES[method]}, "rounds": len(nat_times),
        "native_median_s": round(nat, 5), "torch_median_s": round(tor, 5),
        "native_runs_s": [round(t, 5) for t in nat_times], "torch_runs_s": [round(t, 5) for t in ref_times],
        "speedup_vs_torch": round(tor / nat, 2), "native_input_gbps": round(in_bytes / nat / 1e9, 3),
        "equal_fraction_vs_torch": round(equal, 6),
        # `fastmerge bench kernels`' figure: the bytes the method must move (fastmerge.benchmark.bytes) / time
        "native_physical_gbps": round(physical_bytes(job.method, job.params, base.numel(), T, base.element_size(),
                                                     base.element_size(), True) / nat / 1e9, 3),
    }
    RESULTS[f"{method}-{'x'.join(map(str, shape))}"] = res
    benchmark.extra_info.update(res)
    print(f"\n{method} {shape}: native {nat * 1e3:.1f} ms, torch {tor * 1e3:.1f} ms, speed-up {tor / nat:.1f}x")
