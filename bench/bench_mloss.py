"""M-Loss and M-TIES benchmarks.

1. ``test_mloss_fused``: one layer's node + layer M-Loss at the target shape (B = 128×197 tokens, d_in = 768,
   d_out = 3072, q = 8 fine-tunes: ViT-B/32's ``c_fc`` on 128 images), GELU-tanh (the official code's proxy).
   - CUDA: the fused Triton kernel (``kernels/mloss.py``) against the torch eager reference, median of
     ≥ 3 rounds each, and the extra GPU memory of each (``torch.cuda.max_memory_allocated`` − before).
   - CPU (the interpreter is far too slow at this shape): the eager reference against the chunked torch
     path (``fastmerge.mloss.mloss_chunked``): time, peak RSS growth (VmHWM, reset through
     /proc/self/clear_refs before each), and their largest relative difference; the fused kernel's extra
     memory is its outputs, 3·d_out + 2·B fp32 (stated, not measured: no kernel runs at this shape here).
2. ``test_row_trim``: M-TIES' per-row trim of T = 8 task vectors of a 3072×768 matrix with row keep ratios
   in [0.7, 0.8]: fastmerge's batched selection against the official code's Python loop over rows
   (``torch.topk`` per row, then ≥ its minimum). Same masks asserted.
3. ``test_mties_end_to_end``: ``fastmerge.merge`` of the benchmark family (LLaMA hidden 1024,
   8 layers, bf16, base + 3 fine-tunes) with ``merge_method: m_ties`` (8 × 128 generated calibration
   tokens, every layer) and with plain ``ties`` (same weights 1.0, density 0.8), each in a child process:
   wall time (median of the rounds), the m_ties time split (forward / M-Loss / merging), peak RSS (VmHWM).

    pytest bench/bench_mloss.py --benchmark-disable                          # smoke (tiny shapes, CI)
    FASTMERGE_BENCH_FULL=1 pytest bench/bench_mloss.py --benchmark-enable -s  # the figures (RESULTS.md)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

if not torch.cuda.is_available():  # the smoke run checks the fused kernel under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmerge.mloss import compute_mloss, mloss_chunked, mloss_reference
from fastmerge.mloss.mties import keep_counts, row_keep_ratios, trim_rows
from fastmerge.testing import LlamaShape, make_family

FULL_FAMILY = dict(shape=LlamaShape(hidden=1024, layers=8, intermediate=2816, vocab=32000, heads=16), shard_bytes=100_000_000)
SMOKE_FAMILY = dict(shape=LlamaShape(hidden=64, layers=2, intermediate=176, vocab=320, heads=4), shard_bytes=50_000)
RESULTS: dict[str, dict] = {}


def median_time(fn, rounds: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024.0
    return float("nan")


def peak_rss_growth(fn) -> float:
    """Bytes the process's peak RSS rose above its RSS while ``fn`` ran (Linux: VmHWM reset by clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _status("VmRSS:")
    fn()
    return _status("VmHWM:") - before


def save(bench_dir: Path) -> None:
    (bench_dir / "mloss.json").write_text(json.dumps(RESULTS, indent=1))


# --------------------------------------------------------------------------------------------
# 1. fused M-Loss


def layer_inputs(B: int, d_in: int, d_out: int, q: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, d_in, device=device, generator=g).to(dtype)
    base = 0.02 * torch.randn(d_out, d_in, device=device, generator=g)
    w = (base + 0.002 * torch.randn(q, d_out, d_in, device=device, generator=g)).to(dtype)
    b = (0.01 * torch.randn(q, d_out, device=device, generator=g)).to(dtype)
    return x, w, b


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).item())


def test_mloss_fused(benchmark, bench_full, bench_dir):
    B, d_in, d_out, q = (128 * 197, 768, 3072, 8) if bench_full else (256, 48, 96, 3)
    rounds = 3 if bench_full else 1
    act = "gelu_tanh"
    info: dict = {"shape": {"B": B, "d_in": d_in, "d_out": d_out, "q": q}, "activation": act,
                  "materialised_preacts_bytes": q * B * d_out * 4, "fused_extra_bytes": (3 * d_out + 2 * B) * 4}
    if torch.cuda.is_available():
        dtype = torch.bfloat16
        x, w, b = layer_inputs(B, d_in, d_out, q, dtype, "cuda")
        fused = lambda: compute_mloss(x, w, b, activation=act, backend="triton")  # noqa: E731
        eager = lambda: mloss_reference(x, w, b, act=act)  # noqa: E731

        def gpu_time(fn):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(max(3, rounds)):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return statistics.median(times), times

        def gpu_extra(fn):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            m0 = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - m0

        f_s, f_runs = gpu_time(fused)
        e_s, e_runs = gpu_time(eager)
        got, want = fused(), eager()
        info.update(device=torch.cuda.get_device_name(), dtype="bfloat16", fused_s=f_s, eager_s=e_s,
                    fused_runs=f_runs, eager_runs=e_runs, speedup=e_s / f_s, fused_extra_bytes_measured=gpu_extra(fused),
                    eager_extra_bytes_measured=gpu_extra(eager), max_rel_diff_node_sq=max_rel(got.node("sq"), want.node("sq")))
        benchmark.pedantic(fused, rounds=1, iterations=1)
    else:
        dtype = torch.float32
        x, w, b = layer_inputs(B, d_in, d_out, q, dtype, "cpu")
        eager = lambda: mloss_reference(x, w, b, act=act)  # noqa: E731
        chunked = lambda: mloss_chunked(x, w, b, act=act)  # noqa: E731
        want, got = eager(), chunked()
        e_mem = peak_rss_growth(eager)
        c_mem = peak_rss_growth(chunked)
        out = benchmark.pedantic(chunked, rounds=rounds, iterations=1)
        c_s = benchmark.stats.stats.median if benchmark.stats is not None and not benchmark.disabled else median_time(chunked, 1)[0]
        e_s, e_runs = median_time(eager, rounds)
        info.update(device="cpu", dtype="float32", threads=torch.get_num_threads(), eager_s=e_s, eager_runs=e_runs,
                    chunked_s=c_s, eager_peak_rss_growth_bytes=e_mem, chunked_peak_rss_growth_bytes=c_mem,
                    max_rel_diff_node_sq=max_rel(got.node("sq"), want.node("sq")),
                    max_rel_diff_node_abs=max_rel(got.node("abs"), want.node("abs")),
                    layer_rel_diff=abs(got.layer - want.layer) / want.layer, layer_mloss=want.layer)
        assert out.samples == B
        assert info["max_rel_diff_node_sq"] < 1e-4
        if not bench_full:  # the fused kernel under the interpreter, at the smoke shape only
            fk = compute_mloss(x, w, b, activation=act, backend="triton")
            info["interpreter_max_rel_diff_node_sq"] = max_rel(fk.node("sq"), want.node("sq"))
            assert info["interpreter_max_rel_diff_node_sq"] < 1e-4
    benchmark.extra_info.update(info)
    RESULTS["mloss_fused"] = info
    save(bench_dir)
    print("\nmloss_fused:", json.dumps(info))


# --------------------------------------------------------------------------------------------
# 2. per-row trim


def official_row_trim(delta: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """The official code's trim (m_ties.py): a Python loop over rows, topk, then ≥ its minimum."""
    mask = torch.zeros_like(delta, dtype=torch.bool)
    n = delta.shape[1]
    for i in range(delta.shape[0]):
        k = max(1, int(float(ratios[i]) * n))
        top = torch.topk(delta[i].abs(), k).values
        mask[i] = delta[i].abs() >= top.min()
    return mask


def test_row_trim(benchmark, bench_full, bench_dir):
    R, C, T = (3072, 768, 8) if bench_full else (96, 48, 3)
    rounds = 3 if bench_full else 1
    g = torch.Generator().manual_seed(0)
    deltas = [0.002 * torch.randn(R, C, generator=g) for _ in range(T)]
    ratios = row_keep_ratios(torch.rand(R, generator=g), 0.8, 0.1)
    counts = keep_counts(ratios, C)
    ours = lambda: [trim_rows(d, counts) for d in deltas]  # noqa: E731
    official = lambda: [official_row_trim(d, ratios) for d in deltas]  # noqa: E731
    masks = benchmark.pedantic(ours, rounds=rounds, iterations=1)
    assert all(torch.equal(a, b) for a, b in zip(masks, official()))
    o_s = benchmark.stats.stats.median if benchmark.stats is not None and not benchmark.disabled else median_time(ours, 1)[0]
    r_s, r_runs = median_time(official, rounds)
    info = {"shape": [R, C], "tasks": T, "keep": [0.7, 0.8], "fastmerge_s": o_s, "official_loop_s": r_s,
            "official_runs": r_runs, "speedup": r_s / o_s, "threads": torch.get_num_threads()}
    benchmark.extra_info.update(info)
    RESULTS["row_trim"] = info
    save(bench_dir)
    print("\nrow_trim:", json.dumps(info))


# --------------------------------------------------------------------------------------------
# 3. M-TIES end to end


@pytest.fixture(scope="module")
def family(bench_full, bench_dir) -> dict:
    """The benchmark family, shared with bench_end_to_end.py (same folder and stamp: generated once)."""
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
    return {"root": root, "shape": spec["shape"], "mode": mode}


CHILD = """
import json, sys, time
t0 = time.perf_counter()
import fastmerge
from fastmerge.engine.session import peak_rss_mb
r = fastmerge.merge(sys.argv[1], sys.argv[2], progress=False, overwrite=True)
d = {k: getattr(r, k) for k in ("wall_s", "forward_s", "mloss_s", "merge_s", "bytes_read") if hasattr(r, k)}
d["peak_rss_mb"] = peak_rss_mb()
d["child_s"] = time.perf_counter() - t0
print(json.dumps(d))
"""


def run_child(cfg: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(out)], capture_output=True, text=True, cwd=cfg.parent)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(res.stdout.strip().splitlines()[-1])
    d["process_wall_s"] = wall
    return d


def test_mties_end_to_end(benchmark, family, bench_dir):
    runs = bench_dir / "runs" / f"mloss-{family['mode']}"
    runs.mkdir(parents=True, exist_ok=True)
    shape = family["shape"]
    n_seq, seq = (8, 128) if family["mode"] == "full" else (4, 16)
    calib = runs / "calibration.npy"
    np.save(calib, np.random.default_rng(0).integers(0, shape.vocab, (n_seq, seq)))
    root = family["root"]
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0}} for i in (1, 2, 3)]
    cfgs = {}
    for method in ("ties", "m_ties"):
        params = {"density": 0.8}
        if method == "m_ties":
            params.update({"epsilon": 0.1, "calibration": str(calib)})
        doc = {"merge_method": method, "base_model": str(root / "base"), "models": models, "parameters": params,
               "dtype": "bfloat16"}
        cfgs[method] = runs / f"{method}.yml"
        cfgs[method].write_text(yaml.safe_dump(doc))
    rounds = 3 if family["mode"] == "full" else 1
    res: dict[str, list[dict]] = {"ties": [], "m_ties": []}
    for _ in range(rounds):
        for method in ("ties", "m_ties"):
            out = runs / f"{method}.out"
            shutil.rmtree(out, ignore_errors=True)
            res[method].append(run_child(cfgs[method], out))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    med = lambda m, k: statistics.median(r[k] for r in res[m])  # noqa: E731
    info = {
        "family": repr(shape), "calibration_tokens": n_seq * seq, "rounds": rounds,
        "ties_wall_s": med("ties", "wall_s"), "m_ties_wall_s": med("m_ties", "wall_s"),
        "m_ties_forward_s": med("m_ties", "forward_s"), "m_ties_mloss_s": med("m_ties", "mloss_s"),
        "m_ties_merge_s": med("m_ties", "merge_s"), "ties_peak_rss_mb": med("ties", "peak_rss_mb"),
        "m_ties_peak_rss_mb": med("m_ties", "peak_rss_mb"), "input_mb": res["m_ties"][0]["bytes_read"] / 1e6,
        "ties_process_s": med("ties", "process_wall_s"), "m_ties_process_s": med("m_ties", "process_wall_s"),
        "runs": res, "threads": os.cpu_count(),
    }
    info["m_ties_over_ties"] = info["m_ties_wall_s"] / info["ties_wall_s"]
    benchmark.extra_info.update({k: v for k, v in info.items() if k != "runs"})
    RESULTS["mties_end_to_end"] = info
    save(bench_dir)
    print("\nmties_end_to_end:", json.dumps({k: v for k, v in info.items() if k != "runs"}))
