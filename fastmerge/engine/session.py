"""``Session``: the only way an output folder is produced.

Every engine (``stream``, ``gpu``, ``sweep``, ``layerwise``) runs its merge loop inside one::

    with Session(plan, [Output(out, shards)], reader=..., pool=..., read_ahead_bytes=..., desc=...) as s:
        for i, tensors in s.prefetch:          # tensor groups, read ahead on the reader thread
            ...merge into a pool buffer...
            s.prefetch.release(i)              # input pages dropped
            s.put(name, view, raw)             # written in plan order on the writer thread, raw back to the pool
            s.advance(nbytes)                  # progress

Entering: a temporary directory beside each OUT, one reader per checkpoint (``ModelReader``: torch
views; ``RawReader``: torch-free read-only mappings), the prefetcher over the groups (plan order, or
``order``), one shard writer per output, the buffer pool and its writer thread, the progress bar.
Leaving normally: the writer thread is drained, every shard index and side file written, then every
output renamed into place (all or none). Leaving by an exception: everything is closed and every
temporary directory removed; an ``OSError`` becomes one ``OutputError`` line. The readers are closed
either way. Nothing but complete models is ever left at OUT.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import queue
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import OutputError
from ..io.index import ITEMSIZE
from ..io.reader import Prefetcher, RawView, span
from ..io.side_files import write_side_files
from ..io.writer import Shard, ShardWriter, commit_dir, temp_dir_beside
from .finite import _output_nonfinite


@dataclasses.dataclass
class MergeReport:
    """What a merge did: sizes, times, memory, how many tensors each backend ran, and which engine."""

    out_dir: str
    tensors: int
    bytes_read: int
    bytes_written: int
    wall_s: float
    merge_s: float  # time in backends
    peak_rss_mb: float
    backends: dict[str, int]
    engine: str = ""
    world_size: int = 1  # ranks that wrote it (engine.distributed)
    rank: int = 0  # this process's rank
    kept_shards: int = 0  # shards kept from an interrupted run (--resume)
    out_dtype: str = ""  # the output tensors' dtype(s), e.g. "bfloat16" (set by fastmerge.merge from the plan)
    shards: int = 0  # the output's shard files

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in sorted(self.backends.items()))
        return (
            f"merged {self.tensors} tensors -> {self.out_dir}"
            + (f" ({self.out_dtype}, {self.shards} shard{'s' if self.shards != 1 else ''})" if self.shards else "") + "\n"
            f"  read {self.bytes_read / 1e6:.1f} MB, wrote {self.bytes_written / 1e6:.1f} MB in {self.wall_s:.2f} s "
            f"({self.gbps:.2f} GB/s of input; {self.merge_s:.2f} s in kernels)\n"
            f"  peak RSS {self.peak_rss_mb:.0f} MB; tensors per backend: {per}"
            + (f"; engine: {self.engine}" if self.engine else "")
            + (f"\n  {self.world_size} ranks (totals over all of them)" if self.world_size > 1 else "")
            + (f"\n  resumed: {self.kept_shards} shard(s) kept from the interrupted run" if self.kept_shards else "")
        )


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux: VmHWM, the high-water mark of this address space. Not ru_maxrss:
    it survives execve, so a process spawned by a large parent reports the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (0: unchanged) for the block, restored after: a
    library call must not change its caller's torch."""
    if not threads:
        yield
        return
    from .._lazy import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------------
# buffer pools: reused output buffers, so memory is bounded and pages fault in only on first use


class TorchPool:
    """``count`` reused byte tensors of ``nbytes``; ``take`` returns (raw, typed view of ``shape``)."""

    def __init__(self, nbytes: int, count: int = 2):
        from .._lazy import torch

        self._free: queue.Queue[Any] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8))

    def take(self, shape: Sequence[int], dtype: Any) -> tuple[Any, Any]:
        raw = self._free.get()
        n = 1
        for s in shape:
            n *= s
        view = raw[: n * dtype.itemsize].view(dtype).view(tuple(shape))  # (a 0-d tensor to ask it was ~4 us a run)
        return raw, view

    def give(self, raw: Any) -> None:
        self._free.put(raw)


class RawPool:
    """``count`` reused anonymous mappings (no zero-fill pass, page-aligned, no torch);
    ``take`` returns (raw, ``RawView`` for the kernels, memoryview for the writer)."""

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


# ------------------------------------------------------------------------------------------------
# outputs and the writer thread


#: test hook (the one place it is read): a process that has completed this many shards of a ``Part``
#: kills itself with SIGKILL, as an OOM killer or a lost node would (tests/engine/test_resume.py)
DIE_AFTER_SHARDS_ENV = "FASTMERGE_TEST_DIE_AFTER_SHARDS"


class Part:
    """This process's share of an output that several processes write, or that a later run may resume
    (``engine.distributed``): the shards go into the shared temp folder ``tmp`` (made beforehand), each
    completed shard is appended to this process's ``manifest`` (JSON lines: plan digest, shard name, size,
    the ``io.checksum`` hash of its bytes, sha256 of its header) after its file is closed, and nothing is committed: the
    index, the side files and the rename are rank 0's, after every rank finished."""

    def __init__(self, tmp: Path, manifest: Path, digest: str):
        self.tmp, self.manifest, self.digest = Path(tmp), Path(manifest), digest
        self.completed = 0
        self.current: str | None = None  # the tensor being merged (set by the session's prefetch)
        die = os.environ.get(DIE_AFTER_SHARDS_ENV)
        self._die_after = int(die) if die else None

    def record(self, shard: Shard, size: int, checksum: str) -> None:
        import json

        line = {"digest": self.digest, "shard": shard.filename, "size": size, "hash": checksum,
                "header_sha256": shard.header_sha256()}
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        self.completed += 1
        if self._die_after is not None and self.completed >= self._die_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class Output:
    """One output folder in the making: ``out``, its planned ``shards``, and what writes its side files
    (``side(tmp)``; default ``io.side_files.write_side_files`` of the session's plan). ``part``: write
    only ``shards`` into ``part.tmp`` with a manifest, and leave the index, side files and commit to the
    caller (``engine.distributed``); on failure the completed shards stay there for ``--resume``."""

    def __init__(self, out: str | Path, shards: Sequence[Shard], side: Callable[[Path], None] | None = None,
                 part: Part | None = None):
        self.out = Path(out)
        self.shards = list(shards)
        self.side = side
        self.part = part
        self.tmp: Path | None = None
        self.writer: ShardWriter | None = None

    def open(self) -> None:
        if self.part is not None:
            self.tmp = self.part.tmp
            self.writer = ShardWriter(self.tmp, self.shards, on_shard=self.part.record)
            return
        try:
            self.tmp = temp_dir_beside(self.out)
        except OSError as e:
            raise OutputError(f"{self.out.parent}: cannot create output directory ({e.strerror or e})") from None
        self.writer = ShardWriter(self.tmp, self.shards)

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written if self.writer is not None else 0


class WriteThread:
    """Writes finished tensors in plan order on its own thread, then gives their buffers back to the pool.

    An item is (event, [(name, view), ...], raw, output[, whole]): ``event`` (or None) is waited for first - the
    GPU engine passes the CUDA event of the device-to-host copy - and ``raw`` (or None) goes back to the
    pool after the write into output number ``output``; ``whole`` (a run of small tensors): (one view over
    the views' bytes, back to back, their dtype), written with one ``ShardWriter.write_run``."""

    thread_name = "fastmerge-write"

    def __init__(self, writers: Sequence[ShardWriter], pool: Any):
        self.writers, self.pool = list(writers), pool
        # bounded: an engine without a pool (the rank sweep's new tensors) waits for the writer instead
        # of queueing a model's worth of tensors; a pooled engine never has more than its 2 buffers here
        self.q: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.check: Callable[[str, Any], None] | None = None  # set by the session before the first put
        self.t = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            event, views, raw, k, *whole = item
            whole = whole[0] if whole else None
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()
                    check = self.check
                    if check is not None and whole is not None and not _output_nonfinite(*whole):
                        # a run of small tensors all finite, seen in one pass: a check per tensor cost ~50 us,
                        # half the writer thread's time on 20k tensors of 4 KB (bench/RESULTS.md, "MoE")
                        check = None
                    if check is not None:
                        for name, view in views:
                            check(name, view)  # engine.finite: inf/NaN the merge made, warned once
                    if whole is not None:  # a run: its tensors lie back to back in whole[0], one write per output shard
                        names = getattr(views, "names", None)  # stream.RunViews: no view made for it
                        self.writers[k].write_run(names if names is not None else [name for name, _ in views], whole[0])
                    else:
                        for name, view in views:
                            self.writers[k].write(name, view)
            except BaseException as e:
                self.error = e
            finally:
                if raw is not None and self.pool is not None:
                    self.pool.give(raw)

    def put(self, views: list[tuple[str, Any]], raw: Any = None, event: Any = None, output: int = 0,
            whole: tuple[Any, str] | None = None) -> None:
        """Queue tensors (torch views or memoryviews) for output ``output``; ``raw`` returns to the pool after.
        ``whole``: (one view over all of their bytes, their dtype), checked for inf/NaN first."""
        if self.error is not None:
            raise self.error
        self.q.put((event, views, raw, output) if whole is None else (event, views, raw, output, whole))  # 4: engine.gpu's

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------------------------------------
# the session


class Session:
    """Inputs, outputs, buffers and progress around one merge loop (see the module docstring).

    ``outputs``: one OUT path (its shards: the plan's) or ``Output`` objects (a rank sweep: several;
    the layer-by-layer engine: its own shard order). ``reader``: the reader class (``ModelReader`` or
    ``RawReader``). ``pool``: a callable making the buffer pool (None: no pool). ``order``: the plan
    indices in the order the loop consumes them (default: plan order). ``sources_only``: groups hold
    the sources without the base (methods that ignore it). ``progress``: (total, unit) of the bar
    (default: the input bytes of the groups). ``units``: runs of consecutive plan indices, each read as one
    span per input (``span``: the tensors lie back to back in one file), instead of ``order``: the
    prefetcher then yields (unit number, one view per input over the whole run) and ``release`` takes the
    unit number: one read-ahead populate and drop per input per run (``engine.stream``'s batches)."""

    def __init__(self, plan: Any, outputs: str | Path | Sequence[Output], *, reader: Any,
                 pool: Callable[[], Any] | None = None, read_ahead_bytes: int = 0, desc: str = "fastmerge",
                 order: Sequence[int] | None = None, sources_only: bool = False,
                 progress: tuple[int, str] | None = None, writer_cls: type[WriteThread] = WriteThread,
                 units: Sequence[Sequence[int]] | None = None):
        self.plan = plan
        if isinstance(outputs, (str, Path)):
            outputs = [Output(outputs, plan.shards, part=getattr(plan, "part", None))]
        self.outputs: list[Output] = list(outputs)
        self._reader_cls, self._make_pool, self._read_ahead = reader, pool, read_ahead_bytes
        self._desc, self._sources_only, self._writer_cls = desc, sources_only, writer_cls
        self.units = None if units is None else list(units)  # (ranges, or lists of consecutive indices)
        self.order = list(range(len(plan.tensors))) if order is None and units is None else list(order or ())
        self._progress = progress
        self.prefetch: _OrderedPrefetch | None = None
        self.wthread: WriteThread | None = None
        self.pool: Any = None
        self.bar: Any = None
        self.readers: dict[Path, Any] = {}  # by input file
        self._readers: list[Any] = []
        self._t0 = time.perf_counter()

    # -- entering ------------------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        plan = self.plan
        try:
            for o in self.outputs:
                o.open()
            for ix in plan.indexes.values():
                reader = self._reader_cls(ix)
                self._readers.append(reader)
                for f in ix.files:
                    self.readers.setdefault(f, reader)
            groups = []
            for i in self.order if self.units is None else ():
                t = plan.tensors[i]
                infos = ([t.base] if t.base is not None and not self._sources_only else []) + list(t.sources)
                groups.append([(self.readers[x.file], x) for x in infos])
            for u in self.units or ():
                first, last = plan.tensors[u[0]], plan.tensors[u[-1]]
                infos = ([first.base] if first.base is not None and not self._sources_only else []) + list(first.sources)
                ends = ([last.base] if last.base is not None and not self._sources_only else []) + list(last.sources)
                groups.append([(self.readers[x.file], span(x, e)) for x, e in zip(infos, ends)])
            part = getattr(plan, "part", None)
            order = self.order if self.units is None else list(range(len(self.units)))
            name = (lambda i: plan.tensors[i].name) if self.units is None else (lambda k: plan.tensors[self.units[k][0]].name)
            self.prefetch = _OrderedPrefetch(Prefetcher(groups, budget_bytes=self._read_ahead), order,
                                             None if part is None else lambda i: setattr(part, "current", name(i)))
            self.pool = self._make_pool() if self._make_pool is not None else None
            self.wthread = self._writer_cls([o.writer for o in self.outputs], self.pool)
            from .finite import NonFiniteWatch

            self.wthread.check = NonFiniteWatch(plan).check
            if plan.options.progress:
                from .progress import make_progress  # a bar on a terminal, a line every few seconds in a log

                total, unit = self._progress or (sum(sum(x.nbytes for _, x in g) for g in groups), "B")
                self.bar = make_progress(total, unit, self._desc, sys.stderr)
        except BaseException as e:
            self._fail(e)
            raise
        return self

    # -- the loop's calls ----------------------------------------------------------------------------
    def put(self, name: str, view: Any, raw: Any = None, *, event: Any = None, output: int = 0) -> None:
        """Queue one finished tensor for writing (in plan order); ``raw`` goes back to the pool after."""
        self.wthread.put([(name, view)], raw, event, output)

    def put_many(self, views: list[tuple[str, Any]], raw: Any = None, *, event: Any = None, output: int = 0,
                 whole: tuple[Any, str] | None = None) -> None:
        """Queue several tensors sharing one buffer ``raw`` (a GPU batch) after ``event``; ``whole``: (a view
        over all of their bytes, their dtype), for one inf/NaN check of them all."""
        self.wthread.put(views, raw, event, output, whole)

    def advance(self, n: int) -> None:
        """Progress: ``n`` more units (input bytes by default) merged."""
        if self.bar is not None:
            self.bar.update(n)  # one rate, the bar's own (MB/s of input)

    @property
    def bytes_written(self) -> int:
        return sum(o.bytes_written for o in self.outputs)

    # -- leaving -------------------------------------------------------------------------------------
    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            try:
                self._finish()
            except BaseException as e:
                self._fail(e)
                raise
            return False
        self._fail(exc)  # may turn an OSError into an OutputError; else the body's exception propagates
        return False

    def _finish(self) -> None:
        self.wthread.close()
        self.wthread = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for o in self.outputs:
            o.writer.finalize(index=o.part is None)
            if o.part is None:
                (o.side or (lambda tmp: write_side_files(self.plan, tmp)))(o.tmp)
            else:
                o.tmp = None  # a share: committed by engine.distributed once every share is complete
        self._commit()
        self._close_inputs()

    def _commit(self) -> None:
        """Every output renamed into place, or none: an OUT that appeared during the merge is found before
        any rename, and an output already renamed is removed again if a later rename fails."""
        overwrite = self.plan.options.overwrite
        outputs = [o for o in self.outputs if o.part is None]
        for o in outputs:
            if o.out.exists() and not overwrite:
                raise OutputError(f"{o.out}: output exists (pass --overwrite to replace it)")
        done: list[Path] = []
        try:
            for o in outputs:
                commit_dir(o.tmp, o.out, overwrite)
                o.tmp = None
                done.append(o.out)
        except BaseException:
            for out in done:
                shutil.rmtree(out, ignore_errors=True)
            raise

    def _close_inputs(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()  # its thread holds views into the readers' mappings: stop it first
            self.prefetch = None
        for r in self._readers:
            r.close()
        self._readers.clear()
        self.readers.clear()

    def _fail(self, exc: BaseException) -> None:
        if self.wthread is not None:
            try:
                self.wthread.close()
            except BaseException:
                pass
            self.wthread = None
        for o in self.outputs:
            if o.writer is not None:
                o.writer.abort(remove_partial=o.part is not None)
        self._close_inputs()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for o in self.outputs:
            if o.tmp is not None and o.part is None:  # a share's folder holds other shares: not ours to remove
                shutil.rmtree(o.tmp, ignore_errors=True)
            o.tmp = None
        if isinstance(exc, OSError):
            where = getattr(exc, "filename", None) or self.outputs[0].out
            outs = ", ".join(str(o.out) for o in self.outputs)
            raise OutputError(f"{where}: I/O error ({exc.strerror or exc}); nothing was left at {outs}") from None


class _OrderedPrefetch:
    """The prefetcher, with group positions mapped back to plan indices (``order``)."""

    def __init__(self, prefetch: Prefetcher, order: list[int], on_yield: Callable[[int], None] | None = None):
        self._p, self._order, self._on_yield = prefetch, order, on_yield
        self._pos = {i: k for k, i in enumerate(order)}

    def __iter__(self) -> Iterator[tuple[int, list[Any]]]:
        for k, tensors in self._p:
            if self._on_yield is not None:
                self._on_yield(self._order[k])  # the tensor being merged: named by a failing rank's error
            yield self._order[k], tensors

    def release(self, i: int) -> None:
        self._p.release(self._pos[i])

    def close(self) -> None:
        self._p.close()
