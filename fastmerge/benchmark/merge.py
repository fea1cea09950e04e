"""``fastmerge bench merge CONFIG``: a whole merge, N times, against the floor measured in the same run.

- the merge: ``fastmerge.merge(CONFIG, tmp, overwrite=True, progress=False, ...)``, wall time (plan +
  read + merge + write, ``MergeReport.wall_s``), GB/s of input, peak RSS of that run (Linux: the
  process's VmHWM, reset before each run through ``/proc/self/clear_refs``), GPU peak memory;
- the floor (``floor_once``): every input byte of the plan read once (its pages populated, then dropped,
  through the engine's own read-ahead) and the output's bytes written once through the same shard
  writer, no compute: what no merge of these files can beat on this machine;
- per-stage busy time: read (the read-ahead thread's ``get`` + page population), compute (the merge
  loop's backend calls, ``MergeReport.merge_s``), write (the writer thread's ``ShardWriter.write``).
  They run concurrently, so the largest one bounds the merge. The read and write counters are probes
  (``StageProbe``) wrapped around those calls for the duration of the benchmark only.

Runs alternate floor, merge, floor, merge... so both see the same page-cache state and machine load;
the input files are read once before the first run (warm page cache).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .roofline import gbps
from .timing import Stats


def floor_once(plan: Any, out_dir: str | Path) -> float:
    """Seconds to read every input tensor of ``plan`` once and write its output bytes once (no compute)."""
    from ..io.reader import Prefetcher, RawReader, read_ahead_bytes
    from ..io.writer import ShardWriter

    t0 = time.perf_counter()
    readers: dict = {}
    for ix in plan.indexes.values():
        r = RawReader(ix)
        for f in ix.files:
            readers.setdefault(f, r)
    groups = [[(readers[i.file], i) for i in ([t.base] if t.base else []) + list(t.sources)] for t in plan.tensors]
    pf = Prefetcher(groups, budget_bytes=read_ahead_bytes(max(t.in_bytes for t in plan.tensors)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, plan.shards)
    buf = mmap.mmap(-1, max(t.out_tensor.nbytes for t in plan.tensors))
    try:
        for i, _views in pf:
            pf.release(i)
            w.write(plan.tensors[i].name, memoryview(buf)[: plan.tensors[i].out_tensor.nbytes])
        w.finalize()
    finally:
        pf.close()
        for r in set(readers.values()):
            r.close()
    return time.perf_counter() - t0


class StageProbe:
    """Busy seconds of the read-ahead (reader ``get`` + ``populate``) and the writer (``ShardWriter.write``),
    counted by wrapping those methods while the probe is installed (``with StageProbe() as p:``)."""

    def __init__(self) -> None:
        self.read_s = 0.0
        self.write_s = 0.0
        self._lock = threading.Lock()
        self._saved: list[tuple[type, str, Callable]] = []

    def _wrap(self, cls: type, name: str, stage: str) -> None:
        orig = cls.__dict__[name]
        probe = self

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                with probe._lock:
                    setattr(probe, stage, getattr(probe, stage) + dt)

        self._saved.append((cls, name, orig))
        setattr(cls, name, timed)

    def __enter__(self) -> "StageProbe":
        from ..io import reader, writer

        for cls in (reader.ModelReader, reader.RawReader):
            self._wrap(cls, "get", "read_s")
            self._wrap(cls, "populate", "read_s")
        self._wrap(writer.ShardWriter, "write", "write_s")
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, name, orig in reversed(self._saved):
            setattr(cls, name, orig)
        self._saved.clear()

    def reset(self) -> None:
        with self._lock:
            self.read_s = self.write_s = 0.0


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm(paths: list[Path]) -> int:
    n = 0
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                n += k
    return n


@contextlib.contextmanager
def _workdir(parent: str | Path | None) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=".fastmerge-bench-", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(config: str | Path, repeat: int = 3, workdir: str | Path | None = None, device: str = "auto",
        threads: int = 0, backend: str = "auto", progress: bool = True) -> dict:
    """Benchmark one merge config; the JSON document (``report.SCHEMA``, kind "merge")."""
    import sys

    import fastmerge

    from .machine import machine_info
    from .report import SCHEMA_VERSION

    from ..engine.session import peak_rss_mb

    opts = dict(device=device, threads=threads, backend=backend, progress=False, overwrite=True, copy_tokenizer=False)
    plan = fastmerge.plan(config, **opts)
    files = sorted({i.file for t in plan.tensors for i in ([t.base] if t.base else []) + list(t.sources)})
    _warm(files)
    out_bytes = sum(t.out_tensor.nbytes for t in plan.tensors)
    name = Path(str(config)).name
    floors: list[float] = []
    walls: list[float] = []
    rss: list[float] = []
    gpu: list[float] = []
    stages: list[tuple[float, float, float]] = []
    last: Any = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * repeat, unit="run", desc=f"fastmerge bench merge {name}", file=sys.stderr)
    cuda = plan.device == "cuda"
    with _workdir(workdir or Path.cwd()) as tmp, StageProbe() as probe:
        for k in range(repeat):
            shutil.rmtree(tmp / "floor", ignore_errors=True)
            floors.append(floor_once(plan, tmp / "floor"))
            shutil.rmtree(tmp / "floor", ignore_errors=True)
            if bar is not None:
                bar.update(1)
            probe.reset()
            reset_ok = reset_peak_rss()
            if cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
            rep = fastmerge.merge(config, tmp / "out", **opts)
            walls.append(rep.wall_s)
            rss.append(peak_rss_mb() if reset_ok else float(getattr(rep, "peak_rss_mb", 0.0) or peak_rss_mb()))
            if cuda:
                gpu.append(getattr(rep, "gpu_peak_mb", 0.0))
            stages.append((probe.read_s, float(getattr(rep, "merge_s", 0.0) or 0.0), probe.write_s))
            last = rep
            shutil.rmtree(tmp / "out", ignore_errors=True)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    import statistics

    fs, ms = Stats(tuple(floors)), Stats(tuple(walls))
    med = [statistics.median(s[i] for s in stages) for i in range(3)]
    bound = ("read", "compute", "write")[max(range(3), key=lambda i: med[i])]
    rows = [
        {"name": name, "what": "floor", "time": fs.as_dict(), "input_bytes": plan.in_bytes, "output_bytes": out_bytes,
         "gbps_input": gbps(plan.in_bytes, fs.median), "vs_floor": 1.0, "peak_rss_mb": None, "gpu_peak_mb": None,
         "stages": None},
        {"name": name, "what": "merge", "time": ms.as_dict(), "input_bytes": plan.in_bytes, "output_bytes": out_bytes,
         "gbps_input": gbps(plan.in_bytes, ms.median), "vs_floor": ms.median / fs.median if fs.median > 0 else None,
         "peak_rss_mb": statistics.median(rss), "gpu_peak_mb": statistics.median(gpu) if gpu else None,
         "stages": {"read_s": med[0], "compute_s": med[1], "write_s": med[2], "bound_by": bound},
         "engine": getattr(last, "engine", "") or "", "backends": dict(getattr(last, "backends", {}) or {})},
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "merge",
        "command": " ".join(["fastmerge", *sys.argv[1:]]) if os.path.basename(sys.argv[0]) in ("fastmerge", "__main__.py") else None,
        "machine": machine_info(),
        "settings": {"config": str(config), "method": plan.method.name, "repeat": repeat, "device": device,
                     "threads": threads, "backend": backend, "tensors": len(plan.tensors),
                     "peak_rss": "per run (VmHWM reset before each)" if reset_peak_rss() else "process peak"},
        "results": rows,
    }
