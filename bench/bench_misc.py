"""Per-tensor benchmark: fastmerge vs mergekit 0.1.5's own implementation of sce, arcee_fusion, ram,
ramplus_tl and passthrough, on the same in-memory tensors, in one process.

fastmerge: ``fastmerge.merge_tensors(method, fine_tunes, base, **params)`` in default mode (the
backend ``auto`` picks: the C++ kernel for sce and passthrough, torch for the others), bf16 in, bf16 out. mergekit:
``mergekit.merge_methods.merge_tensors([base, *fine_tunes], method, parameters=..., base_index=0)``, its
in-memory entry point, which runs the same per-group function as its YAML path (arcee_fusion and
ramplus_tl return float32 there, mergekit issue #604; no cast is added to its time).

One 4096x1024 bf16 tensor (base + 3 fine-tunes; arcee_fusion and passthrough take one), each fine-tune
changing ~half of the elements by N(0, 0.002²) so RAM sees unique, shared and unchanged elements.
Rounds alternate mergekit (untimed by pytest-benchmark: its ``setup``, timed here) and fastmerge (the
benchmarked target), after one untimed warm-up of each, so drifting load on a shared machine hits both
tools alike. The ratio is median(mergekit) / median(fastmerge) over the rounds, in
``benchmark.extra_info["speedup_vs_mergekit"]``, and in ``$FASTMERGE_BENCH_DIR/misc.md``.

    pytest bench/bench_misc.py --benchmark-disable     # smoke (CI): a 64x48 tensor, 1 round
    pytest bench/bench_misc.py --benchmark-enable      # 4096x1024, 5 rounds (~1 min on 2 cores)
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
ROUNDS_TIMED = 5
DTYPE = torch.bfloat16
#: method -> (number of non-base models, parameters). sce selects half the positions (the selection is
#: where fastmerge's k-th value threshold and mergekit's top-k differ); passthrough scales.
CASES = {
    "sce": (3, {"select_topk": 0.5}),
    "arcee_fusion": (1, {}),
    "ram": (3, {}),
    "ramplus_tl": (3, {}),
    "passthrough": (1, {"scale": 0.5}),
}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def tensors(timed) -> tuple[torch.Tensor, list[torch.Tensor]]:
    shape = SHAPE_TIMED if timed else SHAPE_SMOKE
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 0.02
    fts = []
    for _ in range(3):
        changed = torch.rand(shape, generator=g) < 0.5
        fts.append((base + 0.002 * torch.randn(shape, generator=g) * changed).to(DTYPE))
    return base.to(DTYPE), fts


def write_table(machine: dict, bench_dir: Path) -> Path | None:
    if not RESULTS:
        return None
    lines = [
        "# Per-tensor merge: fastmerge vs mergekit 0.1.5 (bench/bench_misc.py)",
        "",
        f"{machine.get('date_utc')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
        f"torch threads {machine.get('torch_threads')}, mergekit {machine.get('mergekit')}",
        "",
        "| method | shape | models | params | fastmerge ms (median) | mergekit ms (median) | speed-up vs mergekit | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in RESULTS.items():
        lines.append(
            f"| {m} | {'x'.join(map(str, r['shape']))} {r['dtype']} | {r['models']} | {json.dumps(r['params'])} | "
            f"{r['fastmerge_median_s'] * 1e3:.1f} | {r['mergekit_median_s'] * 1e3:.1f} | {r['speedup_vs_mergekit']:.2f}x | "
            f"{r['rounds']} |"
        )
    return save_table(bench_dir, "misc", lines, {"machine": machine, "results": RESULTS})



@pytest.mark.skipif(not HAS_MERGEKIT, reason="mergekit==0.1.5 is not installed")
@pytest.mark.parametrize("method", list(CASES))
def test_per_tensor(benchmark, tensors, timed, method):
    from mergekit.merge_methods import merge_tensors as mergekit_merge_tensors

    base, fts = tensors
    n, params = CASES[method]
    xs = fts[:n]
    if method == "passthrough":  # base ignored by both tools
        def run_fastmerge():
            return fastmerge.merge_tensors(method, xs, **params)

        def run_mergekit():
            return mergekit_merge_tensors(xs, method, parameters=params)
    else:
        def run_fastmerge():
            return fastmerge.merge_tensors(method, xs, base, **params)

        def run_mergekit():
            return mergekit_merge_tensors([base, *xs], method, parameters=params, base_index=0)

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

    want_shape = run_mergekit().shape  # warm-ups: first-call costs (imports, allocator) of both tools
    assert run_fastmerge().shape == want_shape
    rounds = ROUNDS_TIMED if timed else 1
    benchmark.pedantic(timed_fastmerge, setup=timed_mergekit, rounds=rounds, iterations=1, warmup_rounds=0)
    if not mk_times:  # in case --benchmark-disable ran the target without its setup
        timed_mergekit()
    fm, mk = statistics.median(fm_times), statistics.median(mk_times)
    res = {
        "shape": list(base.shape), "dtype": str(DTYPE).removeprefix("torch."), "models": n, "params": params,
        "rounds": len(fm_times), "fastmerge_median_s": round(fm, 5), "mergekit_median_s": round(mk, 5),
        "fastmerge_runs_s": [round(t, 5) for t in fm_times], "mergekit_runs_s": [round(t, 5) for t in mk_times],
        "speedup_vs_mergekit": round(mk / fm, 3),
    }
    RESULTS[method] = res
    benchmark.extra_info.update(res)
    print(f"\n{method}: fastmerge {fm * 1e3:.1f} ms, mergekit {mk * 1e3:.1f} ms, speed-up {mk / fm:.2f}x")
