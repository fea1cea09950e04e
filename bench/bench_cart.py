"""CART benchmarks: randomized vs exact SVD per matrix (speed and accuracy), and end-to-end CART merges.

1. ``test_cart_matrix``: one matrix group of CLIP ViT-B/32's MLP shape (768×3072), T = 8 fine-tunes,
   ρ = 0.08 (k = 61), fp32. fastmerge's default path (``merge_tensors("cart", ...)``: randomized SVD,
   centering fused, one reconstruct-and-add GEMM) against the official approach (one full
   ``torch.linalg.svd`` per matrix per task, then U_k·S_k·V_kᵀ summed), median of ≥ 3 rounds each.
   The inputs' centered deltas have a slowly decaying (1/i) spectrum.
2. ``test_cart_accuracy``: the done-criteria on the test spectra (power laws i^-0.5 and i^-1, exponential,
   low rank + noise floor): max over tasks of ‖Δ − Δ̃_k‖_F / ‖Δ − Δ_k‖_F, and the merged output's
   relative Frobenius distance to exact CART.
3. ``test_cart_end_to_end``: ``python -m fastmerge merge`` of the benchmark family
   (LLaMA hidden 1024, 8 layers, bf16, base + 3 fine-tunes; the base is not an input of CART) with
   ``merge_method: cart`` as a child process; its peak RSS (VmHWM) against the input size. Then a
   4-value rank sweep (``fastmerge.research.cart.rank_sweep``) of the same family.
4. ``test_cart_gpu`` (CUDA only): 4096×4096 and 4096×14336, T = 8: Triton path vs full SVD per task.

    pytest bench/bench_cart.py --benchmark-disable                        # smoke (tiny shapes, CI)
    FASTMERGE_BENCH_FULL=1 pytest bench/bench_cart.py --benchmark-enable -s # the figures in RESULTS.md
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import fastmerge
from fastmerge.ops.randomized_svd import centered_factors, target_rank
from fastmerge.testing import LlamaShape, make_family

FULL_FAMILY = dict(shape=LlamaShape(hidden=1024, layers=8, intermediate=2816, vocab=32000, heads=16), shard_bytes=100_000_000)
SMOKE_FAMILY = dict(shape=LlamaShape(hidden=64, layers=2, intermediate=176, vocab=320, heads=4), shard_bytes=50_000)
RHO = 0.08
RESULTS: dict[str, dict] = {}


def median_time(fn, rounds: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def with_spectrum(m: int, n: int, sigma: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return (u * sigma[:r]) @ v.T


def spectra(r: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, r + 1, dtype=torch.float32)
    return {
        "power0.5": i ** -0.5,
        "power1": 1.0 / i,
        "exp": torch.exp(-i / (r / 12)),
        "lowrank+noise": torch.where(i <= 6, 10.0 / i, 0.05 * torch.ones_like(i)),
    }


def task_family(m: int, n: int, T: int, sigma: torch.Tensor, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """T fine-tunes of one base (N(0, 0.02²)): base + τ_t, ‖τ_t‖_F = 5% of ‖base‖_F, spectrum ``sigma``."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(m, n, generator=g)
    out = []
    for _ in range(T):
        tau = with_spectrum(m, n, sigma, g)
        out.append((base + tau * (0.05 * base.norm() / tau.norm())).to(dtype))
    return out


def official_cart(xs: list[torch.Tensor], rho: float, lam: float = 1.0) -> torch.Tensor:
    """The official code's arithmetic: θ_avg, then per task a full SVD of θ_t − θ_avg, top-k summed."""
    avg = sum(x.float() for x in xs) / len(xs)
    upd = torch.zeros_like(avg)
    for x in xs:
        u, s, vh = torch.linalg.svd(x.float() - avg, full_matrices=False)
        k = target_rank(x.shape, rho)
        upd += (u[:, :k] * s[:k]) @ vh[:k]
    return avg + lam * upd


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


# --------------------------------------------------------------------------------------------
# 1. one matrix group


def test_cart_matrix(benchmark, bench_full):
    m, n, T = (768, 3072, 8) if bench_full else (96, 384, 3)
    rounds = 5 if bench_full else 1
    xs = task_family(m, n, T, spectra(min(m, n))["power1"], seed=0)
    name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    ours = lambda: fastmerge.merge_tensors("cart", xs, tensor_name=name, rank_ratio=RHO)  # noqa: E731
    out = benchmark.pedantic(ours, rounds=rounds, iterations=1, warmup_rounds=1 if bench_full else 0)
    fast_s = benchmark.stats.stats.median if benchmark.stats is not None and not benchmark.disabled else median_time(ours, 1)[0]
    ref_s, ref_times = median_time(lambda: official_cart(xs, RHO), max(3, rounds) if bench_full else 1)
    exact = official_cart(xs, RHO)
    info = {
        "shape": [m, n], "tasks": T, "rank_ratio": RHO, "k": target_rank((m, n), RHO), "dtype": "float32",
        "fastmerge_s": fast_s, "official_full_svd_s": ref_s, "official_runs_s": [round(t, 3) for t in ref_times],
        "speedup": ref_s / fast_s, "merged_rel_err_vs_exact": rel(out, exact), "threads": torch.get_num_threads(),
    }
    if bench_full:  # one thread as well: on a shared 2-core machine, the figure least affected by neighbours
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            f1, _ = median_time(ours, rounds)
            r1, _ = median_time(lambda: official_cart(xs, RHO), 3)
        finally:
            torch.set_num_threads(threads)
        info.update({"fastmerge_1thread_s": f1, "official_1thread_s": r1, "speedup_1thread": r1 / f1})
    benchmark.extra_info.update(info)
    RESULTS["matrix"] = info
    print(f"\ncart {m}x{n} T={T} k={info['k']}: fastmerge {fast_s * 1e3:.0f} ms, official (full SVD per task) "
          f"{ref_s * 1e3:.0f} ms → {info['speedup']:.1f}×; merged rel. error vs exact {info['merged_rel_err_vs_exact']:.2e}")
    if "speedup_1thread" in info:
        print(f"  1 thread: {info['fastmerge_1thread_s'] * 1e3:.0f} ms vs {info['official_1thread_s'] * 1e3:.0f} ms "
              f"→ {info['speedup_1thread']:.1f}×")
    assert info["merged_rel_err_vs_exact"] < 1e-2
    if bench_full:
        assert info["speedup"] >= 3.0


# --------------------------------------------------------------------------------------------
# 2. accuracy on the test spectra


@pytest.mark.parametrize("spectrum", list(spectra(8)))
def test_cart_accuracy(benchmark, bench_full, spectrum):
    m, n, T = (768, 3072, 8) if bench_full else (96, 384, 3)
    xs = task_family(m, n, T, spectra(min(m, n))[spectrum], seed=1)
    k = target_rank((m, n), RHO)
    ex = centered_factors(xs, k, svd="exact")
    rn = benchmark.pedantic(lambda: centered_factors(xs, k, seed=7), rounds=1, iterations=1)
    ratios = []
    for t in range(T):
        d = xs[t] - ex.avg
        ratios.append(float(torch.linalg.norm(d - rn.lowrank(t)) / torch.linalg.norm(d - ex.lowrank(t))))
    merged = rel(rn.reconstruct(), ex.reconstruct())
    update = rel(rn.reconstruct() - rn.avg, ex.reconstruct() - ex.avg)
    info = {"spectrum": spectrum, "shape": [m, n], "tasks": T, "k": k, "max_truncation_ratio": max(ratios),
            "merged_rel_err": merged, "update_rel_err": update}
    benchmark.extra_info.update(info)
    RESULTS[f"accuracy {spectrum}"] = info
    print(f"\n{spectrum}: truncation ≤ {max(ratios):.4f}× optimal; merged rel. err {merged:.2e} "
          f"(the low-rank update alone: {update:.2e})")
    assert max(ratios) <= 1.02
    assert merged < 1e-2


# --------------------------------------------------------------------------------------------
# 3. end to end


@pytest.fixture(scope="module")
def cart_family(bench_full, bench_dir) -> dict:
    """The bench family (same files and cache stamp as bench_end_to_end.py)."""
    mode = "full" if bench_full else "smoke"
    spec = FULL_FAMILY if bench_full else SMOKE_FAMILY
    root = bench_dir / f"family-{mode}"
    stamp = {"shape": repr(spec["shape"]), "dtype": "bfloat16", "shard_bytes": spec["shard_bytes"], "finetunes": 3, "seed": 0}
    marker = root / "family.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        shutil.rmtree(root, ignore_errors=True)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_family(tmp, spec["shape"], n_finetunes=3, dtype="bfloat16", shard_bytes=spec["shard_bytes"], seed=0)
        (tmp / "family.json").write_text(json.dumps(stamp))
        tmp.rename(root)
    return {"mode": mode, "root": root, "fts": [root / f"ft{i}" for i in (1, 2, 3)]}


def _vmhwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _run_child(cmd: list[str], cwd: Path) -> dict:
    """Wall time and peak RSS (the child's own VmHWM, polled every 10 ms) of ``cmd``."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, text=True)
    hwm = 0.0
    while p.poll() is None:
        v = _vmhwm_mb(p.pid)
        hwm = max(hwm, v or 0.0)
        time.sleep(0.01)
    out, err = p.communicate()
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{err[-3000:]}"
    return {"wall_s": time.perf_counter() - t0, "rss_mb": hwm, "stdout": out}


def test_cart_end_to_end(benchmark, cart_family, bench_dir):
    work = bench_dir / "runs" / cart_family["mode"]
    work.mkdir(parents=True, exist_ok=True)
    doc = {"merge_method": "cart", "models": [{"model": str(f)} for f in cart_family["fts"]],
           "parameters": {"rank_ratio": RHO}, "dtype": "bfloat16"}
    cfg = work / "cart.yml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = work / "cart.fastmerge"
    plan = fastmerge.plan(doc)
    in_mb = plan.in_bytes / 1e6
    largest_group_mb = max(t.in_bytes for t in plan.tensors) / 1e6
    cmd = [sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out), "--no-progress", "--overwrite", "--no-copy-tokenizer"]
    runs = []
    benchmark.pedantic(lambda: runs.append(_run_child(cmd, work)), rounds=1, iterations=1)
    r = runs[-1]
    # a second child: import torch + fastmerge only, the floor of any fastmerge process
    floor = _run_child([sys.executable, "-c", "import torch, fastmerge.research.cart"], work)["rss_mb"]
    sweep_py = (
        "import json, fastmerge.research.cart as c; "
        f"r = c.rank_sweep({str(cfg)!r}, {str(work / 'cart.sweep')!r}, [0.02, 0.04, 0.08, 0.16], "
        "overwrite=True, progress=False); "
        "print(json.dumps({'wall_s': r.wall_s, 'factor_s': r.factor_s, 'reconstruct_s': r.reconstruct_s}))"
    )
    sw = _run_child([sys.executable, "-c", sweep_py], work)
    sweep = json.loads(sw["stdout"].strip().splitlines()[-1])
    info = {
        "mode": cart_family["mode"], "input_mb": round(in_mb), "largest_group_mb": round(largest_group_mb, 1),
        "wall_s": round(r["wall_s"], 2), "peak_rss_mb": round(r["rss_mb"]), "import_floor_rss_mb": round(floor),
        "summary": r["stdout"].strip().splitlines()[-3:],
        "sweep4_wall_s": round(sw["wall_s"], 2), "sweep4_inproc_s": round(sweep["wall_s"], 2),
        "sweep4_svd_s": round(sweep["factor_s"], 2), "sweep4_reconstruct_s": round(sweep["reconstruct_s"], 2),
        "sweep4_peak_rss_mb": round(sw["rss_mb"]), "command": " ".join(cmd),
    }
    benchmark.extra_info.update(info)
    RESULTS["end_to_end"] = info
    print(f"\ncart end to end ({info['mode']}): {in_mb:.0f} MB of input in {r['wall_s']:.1f} s, peak RSS {r['rss_mb']:.0f} MB "
          f"(import floor {floor:.0f} MB, largest tensor group {largest_group_mb:.1f} MB); 4-value rank sweep "
          f"{sw['wall_s']:.1f} s ({sweep['factor_s']:.1f} s SVD, {sweep['reconstruct_s']:.1f} s reconstruct), "
          f"peak RSS {sw['rss_mb']:.0f} MB")
    assert any(out.glob("*.safetensors"))
    # bounded: the process never holds the inputs, only the import floor plus a few tensor groups
    assert r["rss_mb"] < floor + 8 * largest_group_mb + 200
    assert r["rss_mb"] < floor + in_mb or cart_family["mode"] == "smoke"


# --------------------------------------------------------------------------------------------
# 4. GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cart_gpu(benchmark, bench_full, shape):
    m, n = shape if bench_full else (512, 1024)
    T = 8
    xs = [x.to("cuda", torch.bfloat16) for x in task_family(m, n, T, spectra(min(m, n))["power1"], seed=2)]
    k = target_rank((m, n), RHO)

    def ours():
        f = centered_factors(xs, k, seed=3)  # auto: the Triton kernels on CUDA
        r = f.reconstruct(1.0)
        torch.cuda.synchronize()
        return r

    def official():
        r = official_cart(xs, RHO)
        torch.cuda.synchronize()
        return r

    out = benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=1)
    fast_s = median_time(ours, 3)[0]
    official()  # warm-up (cuSOLVER handles)
    ref_s, _ = median_time(official, 3 if bench_full else 1)
    info = {"shape": [m, n], "tasks": T, "k": k, "fastmerge_s": fast_s, "official_full_svd_s": ref_s,
            "speedup": ref_s / fast_s, "merged_rel_err_vs_exact": rel(out, official()),
            "device": torch.cuda.get_device_name()}
    benchmark.extra_info.update(info)
    RESULTS[f"gpu {m}x{n}"] = info
    print(f"\ncart GPU {m}x{n} T={T}: {fast_s * 1e3:.1f} ms vs full SVD {ref_s * 1e3:.0f} ms → {info['speedup']:.0f}×")
    assert info["merged_rel_err_vs_exact"] < 1e-2
    if bench_full:
        assert info["speedup"] >= 10


@pytest.fixture(scope="module", autouse=True)
def _dump(bench_dir, machine):
    yield
    if RESULTS:
        (bench_dir / "cart.json").write_text(json.dumps({"machine": machine, "results": RESULTS}, indent=1, default=str))
