"""GPU benchmarks of the Triton kernels and the streaming GPU engine; skipped without CUDA.

One run on an H100/H200 produces the whole RESULTS table (``$FASTMERGE_BENCH_DIR/kernels.md``, default
bench/out/kernels.md, and kernels.json with every number):

    pytest bench/bench_kernels.py -m gpu --benchmark-enable -p no:cacheprovider -s

Per kernel, on LLM shapes 4096x4096, 4096x14336 and 128256x4096 with T = 2, 4, 8 fine-tunes
(+ base), bf16 in and out, inputs = base + N(0, 0.002²) (never zeros):

- time: ``triton.testing.do_bench`` (CUDA events, median; warm-up first). Every row of every tensor is
  ≥ 32 MB and a case moves ≥ 96 MB, past the 50 MB L2, so repeated runs do not measure the cache;
- GB/s = the bytes the method must move / time: for the method cases the physical-minimum rule of
  ``fastmerge.benchmark.bytes`` (what ``fastmerge bench kernels`` reports; e.g. ties and breadcrumbs read
  every input twice: before 2026-12 this file counted the Triton kernels' own passes, 4x or 5x), for the
  sub-kernel cases (select, select8, ties_fused, copy) the passes of that step; and % of the
  device-to-device copy bandwidth of ``fastmerge.benchmark.roofline.copy_bandwidth`` (a 1 GiB ``copy_``,
  bytes read + written, CUDA events after an L2 flush), measured in this same run;
- speed-up vs the torch reference on the GPU (the method's ``reference()``, fp32 math: mergekit's
  formulation with fastmerge's fp32 arithmetic), and for the selection vs ``torch.kthvalue`` and
  ``torch.argsort`` (mergekit's top-k) per model.

End to end: a generated LLaMA-shaped family of ≥ 1B parameters (base + 3, bf16, ~8.5 GB of input),
merged by ``gpu_runner.execute_cuda`` (ties, dare_ties, task_arithmetic): wall time vs the time to read
the input files once (warm page cache), GPU memory peak; mergekit ``--cuda`` on the same files with
``FASTMERGE_BENCH_MERGEKIT=1`` (slow: off by default).

Knobs: FASTMERGE_BENCH_KERNELS=ties,select (subset), FASTMERGE_BENCH_SHAPES=4096x4096, FASTMERGE_BENCH_T=2,4,
FASTMERGE_BENCH_E2E=0 (skip the end-to-end family).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from benchlib import save_table
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [
    tuple(int(d) for d in s.split("x"))
    for s in os.environ.get("FASTMERGE_BENCH_SHAPES", "4096x4096,4096x14336,128256x4096").split(",")
]
TS = [int(t) for t in os.environ.get("FASTMERGE_BENCH_T", "2,4,8").split(",")]
ALL = [
    "copy", "select", "select8", "ties_fused", "ties", "ties8", "ties_cuda", "dare_ties", "breadcrumbs", "linear",
    "task_arithmetic", "slerp", "model_stock",
]
KERNELS = [k for k in os.environ.get("FASTMERGE_BENCH_KERNELS", ",".join(ALL)).split(",") if k]
DTYPE = torch.bfloat16
DENSITY = 0.5
RESULTS: dict[str, dict] = {}
COPY: dict[str, float] = {}
E2E: dict[str, dict] = {}


def _bench(fn) -> float:
    """Median seconds of ``fn`` (CUDA events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def copy_gbps() -> float:
    """Device-to-device copy bandwidth, bytes read + written, of a 1 GiB buffer (measured once)."""
    if "gbps" not in COPY:
        from fastmerge.benchmark.roofline import copy_bandwidth
        from fastmerge.benchmark.timing import CudaTimer

        COPY["gbps"] = copy_bandwidth("cuda", CudaTimer(), repeats=20).gbps  # `fastmerge bench kernels`' copy
        torch.cuda.empty_cache()
    return COPY["gbps"]


_INPUTS: dict[tuple, tuple] = {}


def inputs(shape: tuple[int, int], T: int):
    """(x [T, N] bf16, base [N] bf16) on the GPU, generated there (one live set at a time)."""
    key = (shape, T)
    if key not in _INPUTS:
        _INPUTS.clear()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(0)
        n = math.prod(shape)
        base = (torch.randn(n, device="cuda", generator=g) * 0.02).to(DTYPE)
        x = torch.empty((T, n), dtype=DTYPE, device="cuda")
        for t in range(T):
            x[t] = (base.float() + 0.002 * torch.randn(n, device="cuda", generator=g)).to(DTYPE)
        _INPUTS[key] = (x, base)
    return _INPUTS[key]


def _physical(method: str, params, n: int, T: int, es: int) -> int:
    """The bytes ``method`` must move (``fastmerge.benchmark.bytes``, as ``fastmerge bench kernels``)."""
    from fastmerge.benchmark.bytes import physical_bytes
    from fastmerge.methods import get_method

    return physical_bytes(get_method(method), params, n, T, es, es, True)


def _rows(x, shape):
    return [x[t].view(shape) for t in range(x.shape[0])]


def _case(kernel: str, shape, T: int):
    """(fastmerge fn, bytes it must move, {baseline name: fn})."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.breadcrumbs import BreadcrumbsKernel
    from fastmerge.kernels.dare import DareKernel
    from fastmerge.kernels.linear import LinearKernel, TaskArithmeticKernel
    from fastmerge.kernels.model_stock import ModelStockKernel
    from fastmerge.kernels.select import kth_largest
    from fastmerge.kernels.slerp import SlerpKernel
    from fastmerge.kernels.ties import TiesKernel
    from fastmerge.methods import get_method
    from fastmerge.methods.base import ParamContext
    from fastmerge.methods.breadcrumbs import BreadcrumbsParams
    from fastmerge.methods.dare import DareParams
    from fastmerge.methods.linear import LinearParams
    from fastmerge.methods.model_stock import ModelStockParams
    from fastmerge.methods.slerp import SlerpParams
    from fastmerge.methods.task_arithmetic import TaskArithmeticParams
    from fastmerge.methods.ties import TiesParams, keep_count

    x, base = inputs(shape, T)
    n = base.numel()
    es = x.element_size()
    segs = Segments.packed([n], shapes=[shape])
    out = torch.empty(n, dtype=DTYPE, device="cuda")
    w = tuple([round(1 / T, 3)] * T)
    rows, b2 = _rows(x, shape), base.view(shape)
    read, write = (T + 1) * n * es, n * es
    base_lines: dict = {}
    if kernel == "copy":
        src = x.view(-1)[: n]
        return (lambda: out.copy_(src)), 2 * n * es, {}
    if kernel in ("select", "select8"):
        k = torch.full((1, T, 1), keep_count(DENSITY, n), dtype=torch.int64)

        def mags():
            return [(x[t].float() - base.float()).abs() for t in range(T)]

        base_lines = {
            "torch.kthvalue": lambda: [torch.kthvalue(m, n - int(k[0, 0, 0]) + 1) for m in mags()],
            "torch.argsort": lambda: [torch.argsort(m, descending=True)[: int(k[0, 0, 0])] for m in mags()],
        }
        if kernel == "select8":  # four 8-bit passes (kernels/select.py PASSES_8) next to the default three
            from fastmerge.kernels.select import PASSES, PASSES_8

            return ((lambda: kth_largest(x, base, segs, k, passes=PASSES_8)), 4 * read,
                    {"select (11-bit passes)": lambda: kth_largest(x, base, segs, k, passes=PASSES)})
        return (lambda: kth_largest(x, base, segs, k)), 3 * read, base_lines
    ties_p = [TiesParams(w, (DENSITY,) * T)]
    ref_ties = lambda: get_method("ties").reference(rows, b2, ties_p[0]).to(DTYPE)  # noqa: E731
    if kernel == "ties_fused":
        k = TiesKernel(ties_p, [n], "cuda")
        for j in range(k.n_passes):
            k.data_pass(j, x, base, segs)
            k.end_pass(j)
        return (lambda: k.merge(x, base, out, segs)), read + write, {"torch reference (whole ties)": ref_ties}
    if kernel == "ties":
        return ((lambda: TiesKernel(ties_p, [n], "cuda").run(x, base, out, segs)), _physical("ties", ties_p[0], n, T, es),
                {"torch reference": ref_ties})
    if kernel == "ties8":  # ties with FASTMERGE_SELECT_BITS=8 (4 selection passes) next to the default

        def ties8():
            from unittest import mock

            with mock.patch.dict(os.environ, {"FASTMERGE_SELECT_BITS": "8"}):
                TiesKernel(ties_p, [n], "cuda").run(x, base, out, segs)

        return ties8, _physical("ties", ties_p[0], n, T, es), {
            "ties (11-bit passes)": lambda: TiesKernel(ties_p, [n], "cuda").run(x, base, out, segs)}
    if kernel == "ties_cuda":  # the CUDA C++ kernel (csrc/cuda/ties.cu) on the same inputs, next to the Triton one
        from fastmerge import _native

        ok, why = _native.cuda_usable()
        if not ok:
            pytest.skip(f"fastmerge._C_cuda not usable: {why}")
        flat = [x[t] for t in range(T)]
        triton_ties = lambda: TiesKernel(ties_p, [n], "cuda").run(x, base, out, segs)  # noqa: E731
        return ((lambda: _native.ties(out, flat, base, w, (DENSITY,) * T, True)), _physical("ties", ties_p[0], n, T, es),
                {"triton ties": triton_ties, "torch reference": ref_ties})
    if kernel == "dare_ties":
        p = [DareParams(w, (DENSITY,) * T, seed=1, key=ParamContext("w").key)]

        def mergekit_like():  # torch.bernoulli masks on the GPU (the reference draws them on the CPU)
            from fastmerge.methods.gta import combine, l1_rescaled

            bf = b2.float()
            wds = []
            for t, xt in enumerate(rows):
                d = xt.float() - bf
                keep = torch.bernoulli(torch.full_like(d, DENSITY)).bool()
                wds.append(w[t] * l1_rescaled(d, keep))
            return combine(bf, wds, w, "sum", False, 1.0).to(DTYPE)

        return ((lambda: DareKernel(p, [n], "cuda", "sum").run(x, base, out, segs)), 2 * read + write,
                {"torch (bernoulli masks)": mergekit_like})
    if kernel == "breadcrumbs":
        p = [BreadcrumbsParams(w, (DENSITY,) * T, (0.01,) * T)]
        ref = lambda: get_method("breadcrumbs").reference(rows, b2, p[0]).to(DTYPE)  # noqa: E731
        return ((lambda: BreadcrumbsKernel(p, [n], "cuda", None).run(x, base, out, segs)), _physical("breadcrumbs", p[0], n, T, es),
                {"torch reference": ref})
    if kernel == "linear":
        p = [LinearParams(w)]

        def ref():
            acc = torch.zeros(n, dtype=torch.float32, device="cuda")
            for t in range(T):
                acc.addcmul_(x[t].float(), torch.tensor(w[t], device="cuda"))
            return (acc / sum(w)).to(DTYPE)

        return (lambda: LinearKernel(p, [n], "cuda").run(x, None, out, segs)), T * n * es + write, {"torch reference": ref}
    if kernel == "task_arithmetic":
        p = [TaskArithmeticParams(w)]
        ref = lambda: get_method("task_arithmetic").reference(rows, b2, p[0]).to(DTYPE)  # noqa: E731
        return (lambda: TaskArithmeticKernel(p, [n], "cuda").run(x, base, out, segs)), read + write, {"torch reference": ref}
    if kernel == "slerp":
        p = [SlerpParams(0.4)]
        x1 = x[:1]
        ref = lambda: get_method("slerp").reference(rows[:1], b2, p[0]).to(DTYPE)  # noqa: E731
        return (lambda: SlerpKernel(p, [n], "cuda").run(x1, base, out, segs)), 2 * 2 * n * es + write, {"torch reference": ref}
    if kernel == "model_stock":
        p = [ModelStockParams()]
        ref = lambda: get_method("model_stock").reference(rows, b2, p[0]).to(DTYPE)  # noqa: E731
        return (lambda: ModelStockKernel(p, [n], "cuda").run(x, base, out, segs)), 2 * read + write, {"torch reference": ref}
    raise AssertionError(kernel)


# The torch references of the sort-bound methods take ~3 s per call at 4096x14336, T=8 (kthvalue/topk of
# every model); at 128256x4096 ~10x that, so they are timed up to this many input elements only.
SORT_BOUND = {"select", "select8", "ties", "ties8", "ties_fused", "ties_cuda", "breadcrumbs"}
SORT_BASELINES = {"torch.kthvalue", "torch reference", "torch reference (whole ties)"}
SLOW_BASELINE_ELEMS = int(os.environ.get("FASTMERGE_BENCH_SLOW_ELEMS", 600_000_000))


def base_elems(shape, T: int) -> int:
    return math.prod(shape) * T


def _timed(fn) -> float:
    """Seconds of one call (CUDA events), for baselines too slow for do_bench's repeat count."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3


CASES = [(k, s, t) for s in SHAPES for t in TS for k in KERNELS if not (k in ("copy", "slerp") and t != TS[0])]


@pytest.mark.parametrize("kernel,shape,T", CASES, ids=[f"{k}-{s[0]}x{s[1]}-T{t}" for k, s, t in CASES])
def test_kernel(benchmark, kernel, shape, T):
    fn, nbytes, baselines = _case(kernel, shape, T)
    fn()
    torch.cuda.synchronize()
    t = _bench(fn)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1, warmup_rounds=1)
    gbps = nbytes / t / 1e9
    res = {
        "kernel": kernel, "shape": list(shape), "T": T if kernel not in ("copy", "slerp") else (1 if kernel == "slerp" else 0),
        "ms": round(t * 1e3, 4), "bytes": nbytes, "GB/s": round(gbps, 1), "copy GB/s": round(copy_gbps(), 1),
        "% of copy": round(100 * gbps / copy_gbps(), 1), "baselines": {},
    }
    for name, ref in baselines.items():
        if kernel in SORT_BOUND and name in SORT_BASELINES and base_elems(shape, T) > SLOW_BASELINE_ELEMS:
            res["baselines"][name] = {"ms": None, "speedup": None, "note": "not timed at this size (sort-bound, ~30 s a call)"}
            continue
        try:
            t0 = time.perf_counter()
            ref()
            torch.cuda.synchronize()
            once = time.perf_counter() - t0  # includes first-call costs: an upper bound
            if once > 0.5:  # seconds per call: three timed calls, not do_bench's dozens
                tr = statistics.median(_timed(ref) for _ in range(3))
            else:
                tr = _bench(ref)
            res["baselines"][name] = {"ms": round(tr * 1e3, 3), "speedup": round(tr / t, 2)}
        except torch.OutOfMemoryError:
            res["baselines"][name] = {"ms": None, "speedup": None, "note": "out of GPU memory"}
        except Exception as e:  # a baseline that cannot run on the GPU is recorded, not fatal to the table
            res["baselines"][name] = {"ms": None, "speedup": None, "note": f"{type(e).__name__}: {str(e)[:80]}"}
        torch.cuda.empty_cache()
    RESULTS[f"{kernel}-{shape[0]}x{shape[1]}-T{T}"] = res
    benchmark.extra_info.update(res)
    print(f"\n{kernel} {shape} T={T}: {t * 1e3:.3f} ms, {gbps:.0f} GB/s ({res['% of copy']}% of copy) {res['baselines']}")


# ------------------------------------------------------------------------------------------------
# end to end


E2E_SHAPE = dict(hidden=2048, layers=18, intermediate=5632, vocab=32000, heads=16)  # 1.06B parameters


def _family(bench_dir: Path):
    from fastmerge.testing import LlamaShape, make_family

    root = bench_dir / "family-gpu-1b"
    marker = root / "done.json"
    shape = LlamaShape(**E2E_SHAPE)
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        make_family(root, shape, n_finetunes=3, dtype="bfloat16", shard_bytes=2_000_000_000, workers=4)
        marker.write_text(json.dumps(E2E_SHAPE))
    params = sum(math.prod(s) for _, s in shape.tensors())
    return root / "base", [root / f"ft{i}" for i in (1, 2, 3)], params


def _read_once(paths: list[Path]) -> tuple[float, int]:
    """Seconds to read every input file once (warm page cache), 64 MB at a time into one buffer."""
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                total += n
    return time.perf_counter() - t0, total


@pytest.mark.skipif(os.environ.get("FASTMERGE_BENCH_E2E") == "0", reason="FASTMERGE_BENCH_E2E=0")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_end_to_end_gpu(benchmark, bench_dir, tmp_path, method):
    import fastmerge
    from fastmerge.engine.gpu import execute_cuda
    from fastmerge.testing import LlamaShape

    base, fts, params = _family(bench_dir)
    files = sorted(p for d in [base, *fts] for p in d.glob("*.safetensors"))
    _read_once(files)  # warm the page cache
    reads = [_read_once(files) for _ in range(3)]
    read_s = statistics.median(r[0] for r in reads)
    in_bytes = reads[0][1]
    mp = {"weight": 0.33} | ({"density": 0.5} if method != "task_arithmetic" else {})
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(f), "parameters": mp} for f in fts]}
    runs = []

    def once():
        p = fastmerge.plan(cfg, tmp_path / "out", device="cuda", progress=False, copy_tokenizer=False, overwrite=True)
        runs.append(execute_cuda(p, tmp_path / "out"))

    once()  # warm-up: kernel compilation, pinned buffers
    benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=0)
    rep = sorted(runs[1:], key=lambda r: r.wall_s)[len(runs[1:]) // 2]
    res = {
        "method": method, "params_B": round(params / 1e9, 3), "input_GB": round(in_bytes / 1e9, 2),
        "wall_s": round(rep.wall_s, 3), "runs_s": [round(r.wall_s, 3) for r in runs[1:]],
        "read_once_s": round(read_s, 3), "wall_vs_read_once": round(rep.wall_s / read_s, 2),
        "GB/s": round(in_bytes / rep.wall_s / 1e9, 2), "gpu_peak_MB": round(rep.gpu_peak_mb), "gpu_budget_MB": round(rep.gpu_budget_mb),
        "largest_group_MB": round(max(2 * 4 * math.prod(s) for _, s in LlamaShape(**E2E_SHAPE).tensors()) / 2**20),
        "kernel_s": round(rep.merge_s, 3), "backends": rep.backends, "units": rep.units,
    }
    if os.environ.get("FASTMERGE_BENCH_MERGEKIT") == "1" and importlib.util.find_spec("mergekit") is not None:
        import yaml

        cfg_path = tmp_path / "mk.yml"
        cfg_path.write_text(yaml.safe_dump(cfg | {"dtype": "bfloat16"}))
        t0 = time.perf_counter()
        subprocess.run(["mergekit-yaml", str(cfg_path), str(tmp_path / "mk"), "--cuda", "--no-copy-tokenizer", "--random-seed", "42"],
                       check=True, capture_output=True)
        res["mergekit_cuda_wall_s"] = round(time.perf_counter() - t0, 2)
    E2E[method] = res
    benchmark.extra_info.update(res)
    print(f"\nend to end {method}: {res}")


# ------------------------------------------------------------------------------------------------
# the table


def _versions() -> dict:
    p = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "?"

    def v(d):
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"device": p.name, "memory_GB": round(p.total_memory / 1e9, 1), "sms": p.multi_processor_count,
            "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__, "triton": v("triton"),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_table(machine: dict, bench_dir: Path) -> Path | None:
    if not (RESULTS or E2E):
        return None
    info = _versions()
    lines = [
        "# Triton kernels and the streaming GPU engine (bench/bench_kernels.py)", "",
        ", ".join(f"{k} {v}" for k, v in info.items()), "",
        f"Device-to-device copy: {COPY.get('gbps', 0):.0f} GB/s (bytes read + written, 1 GiB `copy_`).", "",
        "| kernel | shape | T | ms | GB/s | % of copy | baselines (ms, speed-up) |", "|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS.values():
        bl = "; ".join(f"{k}: {v['ms']} ms, {v['speedup']}x" if v.get("ms") else f"{k}: {v.get('note')}" for k, v in r["baselines"].items())
        lines.append(f"| {r['kernel']} | {r['shape'][0]}x{r['shape'][1]} | {r['T']} | {r['ms']} | {r['GB/s']} | {r['% of copy']} | {bl} |")
    if E2E:
        lines += ["", "## End to end (gpu_runner.execute_cuda, base + 3, bf16)", "",
                  "| method | params (B) | input GB | wall s | read-once s | wall / read-once | GB/s | GPU peak MB "
                  "| largest group MB | kernels s | mergekit --cuda s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in E2E.values():
            lines.append(f"| {r['method']} | {r['params_B']} | {r['input_GB']} | {r['wall_s']} | {r['read_once_s']} | "
                         f"{r['wall_vs_read_once']} | {r['GB/s']} | {r['gpu_peak_MB']} | {r['largest_group_MB']} | "
                         f"{r['kernel_s']} | {r.get('mergekit_cuda_wall_s', '–')} |")
    return save_table(bench_dir, "kernels", lines, {"versions": info, "copy_GBps": COPY, "kernels": RESULTS, "end_to_end": E2E})

