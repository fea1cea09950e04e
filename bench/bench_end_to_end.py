"""End-to-end merge benchmark: fastmerge vs mergekit 0.1.5, side by side, as a user runs them.

Each tool runs as a child process on the same files (warm page cache), so the wall time includes
interpreter start-up and imports (~5 s of every mergekit run, ~1.5 s of `import torch`): that is what
a user waits for. Peak RSS is the child's own VmHWM, polled (not ru_maxrss, which Linux carries across
execve from the spawning process; see ``run_child``). fastmerge's
in-process time is ``MergeReport.wall_s`` from the summary it prints. GB/s = input bytes / wall time.

    pytest bench --benchmark-disable                                  # smoke: tiny family, 1 round (CI)
    FASTMERGE_BENCH_FULL=1 pytest bench --benchmark-enable            # the benchmark family, 3 rounds

The table of the last run goes to ``$FASTMERGE_BENCH_DIR/end_to_end.md`` (default bench/out/).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchlib import full_mode, save_table
import yaml

import fastmerge
from fastmerge.testing import LlamaShape, make_family

# The benchmark family: hidden 1024, 8 layers, intermediate 2816, vocab 32000, 16 heads, untied: 168.3M
# parameters, bf16, 100 MB shards; 1346 MB of input for base + 3 fine-tunes.
FULL = dict(shape=LlamaShape(hidden=1024, layers=8, intermediate=2816, vocab=32000, heads=16), shard_bytes=100_000_000)
# ~0.3 MB per model: the smoke run is dominated by the two tools' start-up (~10 s per mergekit run).
SMOKE = dict(shape=LlamaShape(hidden=64, layers=2, intermediate=176, vocab=320, heads=4), shard_bytes=50_000)
DTYPE = "bfloat16"
ROUNDS_FULL = int(os.environ.get("FASTMERGE_BENCH_ROUNDS", "3"))  # median of >= 3 for any claim
# Every method on the benchmark family, with mergekit 0.1.5's parameter names (weights 0.33,
# linear 1.0 each, density 0.5). "models" picks the fine-tunes (indices into ft1..ft3); "base": use the base.
SPECS: dict[str, dict] = {
    "linear": {"base": False, "params": {"weight": 1.0}},
    "task_arithmetic": {"params": {"weight": 0.33}},
    "ties": {"params": {"weight": 0.33, "density": 0.5}},
    "dare_ties": {"params": {"weight": 0.33, "density": 0.5}},
    "dare_linear": {"params": {"weight": 0.33, "density": 0.5}},
    "breadcrumbs": {"params": {"weight": 0.33, "density": 0.5}},
    "breadcrumbs_ties": {"params": {"weight": 0.33, "density": 0.5}},
    "della": {"params": {"weight": 0.33, "density": 0.5}},
    "della_linear": {"params": {"weight": 0.33, "density": 0.5}},
    "sce": {"params": {}},
    "model_stock": {"params": {}},
    "karcher": {"base": False, "params": {}},
    "multislerp": {"params": {"weight": 0.33}},
    "slerp": {"models": [0], "params": {}, "global": {"t": 0.5}},
    "nuslerp": {"models": [0, 1], "params": {"weight": 0.5}},
    "nearswap": {"models": [0], "params": {}, "global": {"t": 0.001}},
    "arcee_fusion": {"models": [0], "params": {}},
    "ram": {"params": {}},
    "ramplus_tl": {"params": {}},
    "passthrough": {"base": False, "models": [0], "params": {}},
    "cart": {"base": False, "params": {}, "mergekit": False},  # fastmerge only (not a mergekit method)
}
_sel = os.environ.get("FASTMERGE_BENCH_METHODS")
METHODS = tuple(m for m in (_sel.split(",") if _sel else SPECS) if m)
# CI smoke runs mergekit (~7 s of imports per run) only where the harness itself needs checking
SMOKE_MERGEKIT = ("linear", "ties")
# linear reads the 3 fine-tunes, task_arithmetic/ties also the base: one floor per input set
FLOOR_METHODS = ("linear", "task_arithmetic")
TOOLS = ("mergekit", "floor", "fastmerge")
HAS_MERGEKIT = importlib.util.find_spec("mergekit") is not None
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

RESULTS: dict[tuple[str, str], dict] = {}


# ------------------------------------------------------------------------------------------------
# inputs


def _warm(root: Path) -> int:
    """Read every file once so that both tools start from a warm page cache (the benchmark's setting)."""
    n = 0
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    n += len(chunk)
    return n


@pytest.fixture(scope="session")
def family(bench_full, bench_dir) -> dict:
    mode = "full" if bench_full else "smoke"
    spec = FULL if mode == "full" else SMOKE
    root = bench_dir / f"family-{mode}"
    stamp = {"shape": repr(spec["shape"]), "dtype": DTYPE, "shard_bytes": spec["shard_bytes"], "finetunes": 3, "seed": 0}
    marker = root / "family.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        shutil.rmtree(root, ignore_errors=True)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_family(tmp, spec["shape"], n_finetunes=3, dtype=DTYPE, shard_bytes=spec["shard_bytes"], seed=0)
        (tmp / "family.json").write_text(json.dumps(stamp))
        tmp.rename(root)
    _warm(root)
    return {"mode": mode, "root": root, "base": root / "base", "fts": [root / f"ft{i}" for i in (1, 2, 3)],
            "rounds": ROUNDS_FULL if mode == "full" else 1}


def fastmerge_methods() -> set[str]:
    from fastmerge.methods import REGISTRY

    return set(REGISTRY)


def config_for(method: str, fam: dict) -> dict:
    """All weights 0.33 (linear: 1.0 each, no base), density 0.5; see SPECS."""
    spec = SPECS[method]
    fts = [fam["fts"][i] for i in spec.get("models", range(len(fam["fts"])))]
    models = [{"model": str(ft), "parameters": dict(spec["params"])} for ft in fts]
    doc = {"merge_method": method, "models": models, "dtype": DTYPE}
    if spec.get("base", True):
        doc["base_model"] = str(fam["base"])
    if spec.get("global"):
        doc["parameters"] = dict(spec["global"])
    return doc


# ------------------------------------------------------------------------------------------------
# running a child


def _vmhwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_child(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS (MB). stdout/stderr go to files (no pipe stalls).

    Peak RSS is the child's VmHWM (the high-water mark of its own address space), polled every 10 ms
    while it runs; it only grows, so the last reading is the peak up to the last 10 ms. Not ``wait4``'s
    ru_maxrss: Linux carries ru_maxrss across execve, so a child spawned by this (large) pytest process
    would report at least the parent's own peak."""
    env = {**os.environ, **CHILD_ENV}
    with open(log.with_suffix(".out"), "w") as fo, open(log.with_suffix(".err"), "w") as fe:
        t0 = time.perf_counter()
        # cwd outside the repository, so `python -m fastmerge` imports the installed package (with _C)
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=log.parent)
        hwm = 0.0
        while p.poll() is None:
            v = _vmhwm_mb(p.pid)
            if v is not None:
                hwm = max(hwm, v)
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        rss_mb = hwm
    out = log.with_suffix(".out").read_text()
    if p.returncode != 0:
        err = log.with_suffix(".err").read_text()
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{err[-4000:]}")
    return {"wall_s": wall, "rss_mb": rss_mb, "stdout": out}


SUMMARY_WALL = re.compile(r" in ([0-9.]+) s \(")
SUMMARY_KERNELS = re.compile(r"; ([0-9.]+) s in kernels")
SUMMARY_BACKENDS = re.compile(r"tensors per backend: (.*)")


# mergekit-yaml's own main (mergekit/scripts/run_yaml.py: options, validate, run_merge), with run_merge
# timed so that mergekit's in-process time is measured the same way as fastmerge's (after imports).
MERGEKIT_CHILD = """
import sys, time, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
opts = MergeOptions(copy_tokenizer=False, random_seed=42)
opts.apply_global_options()
src = open(sys.argv[1], encoding="utf-8").read()
t0 = time.perf_counter()
run_merge(MergeConfiguration.model_validate(yaml.safe_load(src)), sys.argv[2], options=opts, config_source=src)
print(f"mergekit in-process: run_merge in {time.perf_counter() - t0:.3f} s (")
"""
# The floor of a whole merge: every input page touched once (MADV_POPULATE_READ on the mapped files, then
# dropped, as the fast path does) and the output written once (a reused buffer through the same shard
# writer), no compute: ``fastmerge.benchmark.merge.floor_once``, the floor `fastmerge bench merge` measures.
# Printed like fastmerge's summary so the same regex reads it.
FLOOR_CHILD = """
import sys
import fastmerge
from fastmerge.benchmark.merge import floor_once
p = fastmerge.plan(sys.argv[1])
s = floor_once(p, sys.argv[2])
print(f"floor: touched {p.in_bytes} input bytes, wrote {sum(t.out_tensor.nbytes for t in p.tensors)} in {s:.3f} s (")
"""


def command(tool: str, cfg: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        return [sys.executable, "-c", MERGEKIT_CHILD, str(cfg), str(out)]
    if tool == "floor":
        return [sys.executable, "-c", FLOOR_CHILD, str(cfg), str(out)]
    return [sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out), "--no-progress", "--overwrite",
            "--no-copy-tokenizer"]


# ------------------------------------------------------------------------------------------------
# the benchmark



def _measured(method: str, tool: str, full: bool) -> bool:
    """The (method, tool) pairs this mode measures: mergekit only on mergekit's methods (and in smoke mode on
    SMOKE_MERGEKIT), the read-once/write-once floor only for FLOOR_METHODS (it depends only on the input set).
    The others are not collected (they were ~40 skips per run)."""
    if tool == "mergekit":
        return SPECS[method].get("mergekit", True) and (full or method in SMOKE_MERGEKIT)
    return tool != "floor" or method in FLOOR_METHODS


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ == "test_end_to_end":
        full = full_mode(metafunc.config)
        metafunc.parametrize(("method", "tool"), [(m, t) for m in METHODS for t in TOOLS if _measured(m, t, full)],
                             ids=lambda v: v)


def test_end_to_end(benchmark, family, bench_dir, method, tool):
    if method not in fastmerge_methods():
        pytest.skip(f"'{method}' is not registered in this fastmerge")
    if tool == "mergekit" and not HAS_MERGEKIT:
        pytest.skip("mergekit is not importable (pip install mergekit==0.1.5)")
    work = bench_dir / "runs" / family["mode"]
    work.mkdir(parents=True, exist_ok=True)
    doc = config_for(method, family)
    cfg = work / f"{method}.yml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = work / f"{method}.{tool}"
    in_bytes = fastmerge.plan(doc).in_bytes
    cmd = command(tool, cfg, out)
    runs: list[dict] = []

    def setup():  # untimed: both tools write into a folder that does not exist yet
        shutil.rmtree(out, ignore_errors=True)

    def once():
        r = run_child(cmd, work / f"{method}.{tool}.run{len(runs)}.log")
        m = SUMMARY_WALL.search(r["stdout"])
        assert m, f"no timing summary in {tool}'s output:\n{r['stdout'][-2000:]}"
        r["inproc_s"] = float(m.group(1))
        if tool == "fastmerge":
            k = SUMMARY_KERNELS.search(r["stdout"])
            r["kernels_s"] = float(k.group(1)) if k else None
            b = SUMMARY_BACKENDS.search(r["stdout"])
            r["backends"] = b.group(1).strip() if b else "?"
        runs.append(r)

    benchmark.pedantic(once, setup=setup, rounds=family["rounds"], iterations=1, warmup_rounds=0)
    assert any(out.glob("*.safetensors")), f"{tool} wrote no safetensors to {out}"

    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    res = {
        "method": method, "tool": tool, "mode": family["mode"], "runs": len(runs), "wall_s": med("wall_s"),
        "walls": [round(r["wall_s"], 2) for r in runs], "rss_mb": med("rss_mb"), "in_mb": in_bytes / 1e6,
    }
    res["gbps"] = in_bytes / res["wall_s"] / 1e9
    res["inproc_s"] = med("inproc_s")
    res["gbps_inproc"] = in_bytes / res["inproc_s"] / 1e9 if res["inproc_s"] > 0 else None
    if tool == "fastmerge":
        res["kernels_s"] = statistics.median(r["kernels_s"] for r in runs) if all(r["kernels_s"] is not None for r in runs) else None
        res["backends"] = runs[-1]["backends"]
        mk = RESULTS.get((method, "mergekit"))
        if mk:
            res["speedup"] = mk["wall_s"] / res["wall_s"]
            res["speedup_inproc"] = mk["inproc_s"] / res["inproc_s"] if res["inproc_s"] > 0 else None
            res["rss_ratio"] = res["rss_mb"] / mk["rss_mb"]
        floor = RESULTS.get(("linear" if method == "linear" else "task_arithmetic", "floor"))
        if floor and floor["inproc_s"] > 0:
            res["vs_floor"] = res["inproc_s"] / floor["inproc_s"]
    RESULTS[(method, tool)] = res
    benchmark.extra_info.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()})
    benchmark.extra_info["command"] = " ".join(cmd)


# ------------------------------------------------------------------------------------------------
# report


def write_table(machine: dict, root: Path) -> Path | None:
    if not RESULTS:
        return None
    rows = [RESULTS[k] for m in METHODS for t in TOOLS if (k := (m, t)) in RESULTS]
    mode = next(iter(RESULTS.values())).get("mode") or ""
    lines = [
        "# fastmerge vs mergekit: end-to-end merge",
        "",
        f"{machine['date_utc']}; {machine['cpu_count']} CPUs, {machine['mem_total_gb']} GiB, "
        f"CUDA {'yes' if machine['cuda_available'] else 'no'}; torch {machine['torch']}, fastmerge {machine['fastmerge']} "
        f"(native CPU extension: {machine['fastmerge_native_cpu_ext']}), mergekit {machine['mergekit']}.",
        "",
        "| method | tool | wall s (median) | runs (s) | in-process s | peak RSS MB | input MB | GB/s of input | in-process GB/s "
        "| speed-up vs mergekit (wall) | speed-up in-process | in-process / floor | RSS vs mergekit | backends |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "–"  # noqa: E731
        lines.append(
            f"| {r['method']} | {r['tool']} | {r['wall_s']:.2f} | {', '.join(map(str, r['walls']))} | {f('inproc_s', '.2f')} | "
            f"{r['rss_mb']:.0f} | {r['in_mb']:.0f} | {r['gbps']:.3g} | {f('gbps_inproc', '.3g')} | "
            f"{f('speedup', '.2f')}{'×' if r.get('speedup') else ''} | "
            f"{f('speedup_inproc', '.1f')}{'×' if r.get('speedup_inproc') else ''} | {f('vs_floor', '.2f')} | "
            f"{f('rss_ratio', '.2f')} | {r.get('backends', '')} |"
        )
    lines += ["", "wall: child process start to exit (includes imports); GB/s = input bytes / wall; "
              "peak RSS: the child's VmHWM (polled); in-process: fastmerge's MergeReport.wall_s "
              "(no interpreter start-up); mergekit's: its run_merge() timed in the child; floor: every input page "
              "touched once + the output written once (same plan, no compute); in-process / floor compares "
              "fastmerge with the floor of its input set (linear: the 3 fine-tunes; others: + base).", ""]
    return save_table(root, "end_to_end", [*lines, "", f"mode: {mode}"], {"machine": machine, "results": rows})
