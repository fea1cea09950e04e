"""Per-tensor benchmark of the sparsifying task-arithmetic family: fastmerge vs mergekit 0.1.5's own
implementation of dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and della_linear, on the
same in-memory tensors, in one process.

fastmerge: ``fastmerge.merge_tensors(method, fine_tunes, base, **params)`` (the backend ``auto``
picks: the C++ kernels in default mode, torch under ``mergekit_compat``), bf16 in, bf16 out, in default mode (fp32 math) and in
``mergekit_compat`` mode (mergekit's bf16 arithmetic). mergekit:
``mergekit.merge_methods.merge_tensors([base, *fine_tunes], method, parameters=..., base_index=0)``, its
in-memory entry point, which calls the same ``GeneralizedTaskArithmeticMerge.merge_group`` as its YAML
path. Parameters: weight 0.33, density 0.5 for every fine-tune, gamma 0.01 (breadcrumbs*), epsilon 0.15
(della*), each method's defaults otherwise (rescale on for dare*/della*).

One 4096x1024 bf16 tensor, base + 3 fine-tunes = base + N(0, 0.002²). Rounds alternate mergekit (run in
pytest-benchmark's untimed ``setup``, timed here) and fastmerge (the benchmarked target), after one
untimed warm-up of each, so drifting load on the shared machine hits both tools alike. The ratio is
median(mergekit) / median(fastmerge), in ``benchmark.extra_info["speedup_vs_mergekit"]`` and in
``$FASTMERGE_BENCH_DIR/sparsify.md``.

    pytest bench/bench_sparsify.py --benchmark-disable     # smoke (CI): a 64x48 tensor, 1 round
    pytest bench/bench_sparsify.py --benchmark-enable      # 4096x1024, 3 rounds (~2 min on 2 cores)
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path

import pytest
from benchlib import save_table
import torch

import fastmerge

HAS_MERGEKIT = importlib.util.find_spec("mergekit") is not None
SHAPE_TIMED, SHAPE_SMOKE = (4096, 1024), (64, 48)
ROUNDS_TIMED = 3
DTYPE = torch.bfloat16
COMMON = {"weight": 0.33, "density": 0.5}
CASES = {
    "dare_linear": {},
    "dare_ties": {},
    "breadcrumbs": {"gamma": 0.01},
    "breadcrumbs_ties": {"gamma": 0.01},
    "della": {"epsilon": 0.15},
    "della_linear": {"epsilon": 0.15},
}
MODES = ("default", "compat")
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def tensors(timed) -> tuple[torch.Tensor, list[torch.Tensor]]:
    shape = SHAPE_TIMED if timed else SHAPE_SMOKE
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 0.02
    fts = [(base + 0.002 * torch.randn(shape, generator=g)).to(DTYPE) for _ in range(3)]
    return base.to(DTYPE), fts


def write_table(machine: dict, bench_dir: Path) -> Path | None:
    if not RESULTS:
        return None
    lines = [
        "# Per-tensor merge, sparsifying task arithmetic: fastmerge vs mergekit 0.1.5 (bench/bench_sparsify.py)",
        "",
        f"{machine.get('date_utc')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
        f"torch threads {machine.get('torch_threads')}, mergekit {machine.get('mergekit')}",
        "",
        "| method | fastmerge mode | shape | params | fastmerge ms (median) | mergekit ms (median) | speed-up vs mergekit | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS.values():
        lines.append(
            f"| {r['method']} | {r['mode']} | {'x'.join(map(str, r['shape']))} {r['dtype']} x{r['models']} | "
            f"{json.dumps(r['params'])} | {r['fastmerge_median_s'] * 1e3:.1f} | {r['mergekit_median_s'] * 1e3:.1f} | "
            f"{r['speedup_vs_mergekit']:.2f}x | {r['rounds']} |"
        )
    return save_table(bench_dir, "sparsify", lines, {"machine": machine, "results": RESULTS})



@pytest.mark.skipif(not HAS_MERGEKIT, reason="mergekit==0.1.5 is not installed")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", list(CASES))
def test_per_tensor(benchmark, tensors, timed, method, mode):
    from mergekit.merge_methods import merge_tensors as mergekit_merge_tensors

    base, fts = tensors
    params = {**COMMON, **CASES[method]}
    compat = mode == "compat"

    def run_fastmerge():
        return fastmerge.merge_tensors(method, fts, base, mergekit_compat=compat, seed=42,
                                       tensor_name="model.layers.0.mlp.up_proj.weight", **params)

    def run_mergekit():
        return mergekit_merge_tensors([base, *fts], method, parameters=params, base_index=0)

    fm_times: list[float] = []
    mk_times: list[float] = []

    def timed_fastmerge():
        t0 = time.perf_counter()
        out = run_fastmerge()
        fm_times.append(time.perf_counter() - t0)
        return out

    def timed_mergekit():  # pytest-benchmark's untimed setup, called before each fastmerge round
        t0 = time.perf_counter()
        run_mergekit()
        mk_times.append(time.perf_counter() - t0)

    want = run_mergekit()  # warm-ups: first-call costs (imports, allocator) of both tools
    got = run_fastmerge()
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    rounds = ROUNDS_TIMED if timed else 1
    out = benchmark.pedantic(timed_fastmerge, setup=timed_mergekit, rounds=rounds, iterations=1, warmup_rounds=0)
    if not mk_times:  # --benchmark-disable runs the target once without its setup
        timed_mergekit()
    if out is None or not fm_times:
        timed_fastmerge()
    fm, mk = statistics.median(fm_times), statistics.median(mk_times)
    res = {
        "method": method, "mode": mode, "shape": list(base.shape), "dtype": str(DTYPE).removeprefix("torch."),
        "models": len(fts), "params": params, "rounds": len(fm_times),
        "fastmerge_median_s": round(fm, 5), "mergekit_median_s": round(mk, 5),
        "fastmerge_runs_s": [round(t, 5) for t in fm_times], "mergekit_runs_s": [round(t, 5) for t in mk_times],
        "speedup_vs_mergekit": round(mk / fm, 3),
    }
    RESULTS[f"{method}-{mode}"] = res
    benchmark.extra_info.update(res)
    print(f"\n{method} ({mode}): fastmerge {fm * 1e3:.1f} ms, mergekit {mk * 1e3:.1f} ms, speed-up {mk / fm:.2f}x")
