"""The torch-free native engine: read (mapped files) → C++ kernel → write, without importing torch.

Why a second engine: on the 2-core reference machine ``import torch`` takes 1.2-1.7 s, more than the
whole native merge of the 1.3 GB benchmark family (bench/RESULTS.md), and torch's own allocations add
~265 MB of RSS. When every tensor of a plan runs on the native backend, nothing needs torch: the
inputs are read-only mappings of the safetensors files (``io.reader.RawReader``, addresses from the
validated headers), the kernels take raw pointers (``fastmerge._C``), and the outputs are two reused
anonymous-memory buffers handed to the same streaming writer. Everything else - the plan, the
prefetcher (page population ahead, page release after use), the writer thread, the atomic commit and
the side files - is shared with ``fastmerge.runner``, so both engines write identical output (tested).

``try_execute`` returns None, and the caller falls back to ``runner.execute``, when any tensor needs
another backend, mergekit-compat casting, a ``.bin`` input, or when ``FASTMERGE_FASTPATH=0``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import time
from pathlib import Path

from .backends.base import MergeJob
from .backends.native import passthrough_reason
from .io.reader import READ_AHEAD, RawReader, RawView
from .io.index import ITEMSIZE
from .plan import MergePlan


def why_not(plan: MergePlan) -> str | None:
    """Why ``plan`` cannot run on the fast path (None: it can)."""
    if os.environ.get("FASTMERGE_FASTPATH", "1") == "0":
        return "FASTMERGE_FASTPATH=0"
    if not RawReader.available():
        return "no POSIX mmap/madvise here"
    if plan.device != "cpu":
        return f"device {plan.device}"
    if any(ix.fmt != "safetensors" for ix in plan.indexes.values()):
        return "a .bin checkpoint (read through torch.load)"
    for t in plan.tensors:
        if t.compute_dtype:
            return "mergekit_compat casts inputs to the compute dtype"
        if t.backend != "native":
            return f"tensor '{t.name}' runs on {t.backend}"
        if t.input_transform is not None:  # tokenizer_source: vocabulary remapping of embedding rows
            return f"tensor '{t.name}' has an input transform"
        if plan.method.name == "passthrough":
            src = t.sources[0] if t.sources else t.base
            why = passthrough_reason(t.params.scale[0], src.dtype, t.out_dtype)
            if why is not None:
                return f"tensor '{t.name}': {why}"
    return None


class _RawPool:
    """Two reused output buffers (anonymous mappings: no zero-fill pass, page-aligned, first-touch
    faults only on the first two tensors)."""

    def __init__(self, nbytes: int, count: int = 2):
        self._free: queue.Queue[tuple[mmap.mmap, int]] = queue.Queue()
        self._all = []
        for _ in range(count):
            m = mmap.mmap(-1, max(nbytes, 1))
            holder = ctypes.c_char.from_buffer(m)  # pins the mapping while we use its address
            self._all.append((m, holder))
            self._free.put((m, ctypes.addressof(holder)))

    def take(self, nbytes: int, dtype: str) -> tuple[tuple[mmap.mmap, int], RawView, memoryview]:
        m, addr = self._free.get()
        return (m, addr), RawView(addr, nbytes, dtype, nbytes // ITEMSIZE[dtype]), memoryview(m)[:nbytes]

    def give(self, raw: tuple[mmap.mmap, int]) -> None:
        self._free.put(raw)


def try_execute(plan: MergePlan, out: str | Path):  # -> MergeReport | None
    """Run ``plan`` on the fast path if it can (see ``why_not``); else None, having done nothing."""
    if why_not(plan) is not None:
        return None
    return _execute(plan, Path(out))


def execute(plan: MergePlan, out: Path):  # -> MergeReport
    """Run ``plan`` (every tensor on the native backend) and write the merged model to ``out``, atomically."""
    reason = why_not(plan)
    if reason is not None:
        raise ValueError(f"fastpath.execute: this plan cannot run here ({reason})")
    return _execute(plan, Path(out))


def _execute(plan: MergePlan, out: Path):  # -> MergeReport
    from .backends import BACKENDS
    from .runner import MergeReport, OutputSession, peak_rss_mb

    t0 = time.perf_counter()
    native = BACKENDS["native"]
    threads = plan.options.threads
    merge_s = 0.0
    largest = max((t.in_bytes for t in plan.tensors), default=0)
    out_bytes = max((t.out_tensor.nbytes for t in plan.tensors), default=1)
    with OutputSession(plan, Path(out), RawReader, lambda: _RawPool(out_bytes), int(READ_AHEAD * largest),
                       f"fastmerge {plan.method.name}") as session:
        for i, views in session.prefetch:
            tp = plan.tensors[i]
            base = views[0] if tp.base is not None else None
            inputs = views[1:] if tp.base is not None else views
            raw, view, mv = session.pool.take(tp.out_tensor.nbytes, tp.out_dtype)
            ts = time.perf_counter()
            native.run_raw(MergeJob(tp.name, plan.method, tp.params, False), view, inputs, base, threads, shape=tp.shape)
            merge_s += time.perf_counter() - ts
            session.prefetch.release(i)
            session.wthread.put(tp.name, mv, raw)
            session.advance(tp.in_bytes)
    return MergeReport(
        out_dir=str(out), tensors=len(plan.tensors), bytes_read=plan.in_bytes, bytes_written=session.writer.bytes_written,
        wall_s=time.perf_counter() - t0, merge_s=merge_s, peak_rss_mb=peak_rss_mb(), backends={"native": len(plan.tensors)},
    )
