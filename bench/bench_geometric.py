"""Per-tensor benchmark: fastmerge vs mergekit 0.1.5's own implementation of the geometric methods
(slerp, nuslerp, multislerp, karcher, model_stock, nearswap), on the same in-memory tensors, in one process.

fastmerge: ``fastmerge.merge_tensors(method, fine_tunes, base, **params)``, bf16 in, bf16 out, in default
mode (the benchmarked target: coefficients from an fp64 Gram matrix plus one fp32 pass, see
fastmerge/methods/sphere.py) and, for reference, in ``mergekit_compat`` mode (mergekit's own sequence of
operations, bit-identical output; its time is in ``extra_info``). mergekit:
``mergekit.merge_methods.merge_tensors([base, *fine_tunes], method, parameters=..., base_index=0)``, its
in-memory entry point, which runs the same per-group function as its YAML path (batch of one).

One 4096x1024 bf16 tensor per model: base N(0, 0.02²), fine-tunes base + N(0, 0.002²) (cos ≈ 0.995 to the
base, like real fine-tunes). Inputs per method: slerp and nearswap base + 1, nuslerp base + 2,
multislerp and model_stock base + 3, karcher 3 models (it takes no base). Each round runs mergekit and
fastmerge-compat (pytest-benchmark's untimed ``setup``, timed here) and then fastmerge default (the
benchmarked target), after one untimed warm-up of each, so drifting load on a shared machine hits all
alike. The ratio is median(mergekit) / median(fastmerge) over the rounds, in
``benchmark.extra_info["speedup_vs_mergekit"]``, and in ``$FASTMERGE_BENCH_DIR/geometric.md``.

    pytest bench/bench_geometric.py --benchmark-disable     # smoke (CI): a 64x48 tensor, 1 round
    pytest bench/bench_geometric.py --benchmark-enable      # 4096x1024, 5 rounds (~1 min on 2 cores)
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
#: method -> (number of non-base models, uses the base, parameters)
CASES = {
    "slerp": (1, True, {"t": 0.3}),
    "nuslerp": (2, True, {"weight": [0.4, 0.6]}),
    "multislerp": (3, True, {"weight": [0.3, 0.3, 0.4]}),
    "karcher": (3, False, {}),
    "model_stock": (3, True, {}),
    "nearswap": (1, True, {"t": 0.001}),
}
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
        "# Per-tensor merge, geometric methods: fastmerge vs mergekit 0.1.5 (bench/bench_geometric.py)",
        "",
        f"{machine.get('date_utc')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
        f"torch threads {machine.get('torch_threads')}, mergekit {machine.get('mergekit')}",
        "",
        "| method | shape | models | params | fastmerge ms (median) | fastmerge compat ms | mergekit ms (median) | "
        "speed-up vs mergekit | compat speed-up | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in RESULTS.items():
        lines.append(
            f"| {m} | {'x'.join(map(str, r['shape']))} {r['dtype']} | {r['models']}{' + base' if r['base'] else ''} | "
            f"{json.dumps(r['params'])} | {r['fastmerge_median_s'] * 1e3:.1f} | {r['compat_median_s'] * 1e3:.1f} | "
            f"{r['mergekit_median_s'] * 1e3:.1f} | {r['speedup_vs_mergekit']:.2f}x | {r['compat_speedup_vs_mergekit']:.2f}x | "
            f"{r['rounds']} |"
        )
    return save_table(bench_dir, "geometric", lines, {"machine": machine, "results": RESULTS})



@pytest.mark.skipif(not HAS_MERGEKIT, reason="mergekit==0.1.5 is not installed")
@pytest.mark.parametrize("method", list(CASES))
def test_per_tensor(benchmark, tensors, timed, method):
    from mergekit.merge_methods import merge_tensors as mergekit_merge_tensors

    base, fts = tensors
    n, with_base, params = CASES[method]
    xs = fts[:n]
    fm_base = base if with_base else None
    mk_inputs, mk_base = ([base, *xs], 0) if with_base else (list(xs), None)

    def run_fastmerge(compat: bool = False) -> torch.Tensor:
        return fastmerge.merge_tensors(method, xs, fm_base, mergekit_compat=compat, **params)

    def run_mergekit() -> torch.Tensor:
        return mergekit_merge_tensors(mk_inputs, method, parameters=params, base_index=mk_base)

    times: dict[str, list[float]] = {"fastmerge": [], "compat": [], "mergekit": []}

    def clock(key: str, fn) -> torch.Tensor:
        t0 = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - t0)
        return out

    def timed_fastmerge() -> torch.Tensor:
        return clock("fastmerge", run_fastmerge)

    def others() -> None:  # pytest-benchmark's untimed setup, called before each fastmerge round
        clock("mergekit", run_mergekit)
        clock("compat", lambda: run_fastmerge(True))

    # warm-ups (first-call costs of both tools), and the sanity check that both do the same work:
    # compat mode reproduces mergekit bit for bit, default mode is the same merge up to rounding
    want = run_mergekit()
    got = run_fastmerge()
    assert torch.equal(run_fastmerge(True), want), f"{method}: mergekit_compat output differs from mergekit's"
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got.float(), want.float(), rtol=0, atol=4 * 2**-8 * float(want.float().abs().max()))

    rounds = ROUNDS_TIMED if timed else 1
    benchmark.pedantic(timed_fastmerge, setup=others, rounds=rounds, iterations=1, warmup_rounds=0)
    if not times["mergekit"]:  # in case --benchmark-disable ran the target without its setup
        others()
    if not times["fastmerge"]:
        timed_fastmerge()
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "shape": list(base.shape), "dtype": str(DTYPE).removeprefix("torch."), "models": n, "base": with_base,
        "params": params, "rounds": len(times["fastmerge"]),
        "fastmerge_median_s": round(med["fastmerge"], 5), "compat_median_s": round(med["compat"], 5),
        "mergekit_median_s": round(med["mergekit"], 5),
        "fastmerge_runs_s": [round(t, 5) for t in times["fastmerge"]],
        "compat_runs_s": [round(t, 5) for t in times["compat"]],
        "mergekit_runs_s": [round(t, 5) for t in times["mergekit"]],
        "speedup_vs_mergekit": round(med["mergekit"] / med["fastmerge"], 3),
        "compat_speedup_vs_mergekit": round(med["mergekit"] / med["compat"], 3),
    }
    RESULTS[method] = res
    benchmark.extra_info.update(res)
    print(f"\n{method}: fastmerge {med['fastmerge'] * 1e3:.1f} ms (compat {med['compat'] * 1e3:.1f} ms), "
          f"mergekit {med['mergekit'] * 1e3:.1f} ms, speed-up {res['speedup_vs_mergekit']:.2f}x")
