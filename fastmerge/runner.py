"""Execute a plan: read (background thread) → merge (backend) → write (background thread), bounded memory.

Peak host memory ≈ the current tensor group + one read-ahead group (input pages are dropped after use,
see io.reader) + two reused output buffers of the largest output tensor. It does not grow with the
number of tensors or the size of a shard. Output lands in a temporary directory beside OUT that is
renamed into place only when every tensor and side file was written; on any error it is removed.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ._lazy import torch

from . import backends
from .backends.base import MergeJob
from .errors import FastMergeError, OutputError
from .io.reader import READ_AHEAD, ModelReader, Prefetcher
from .io.writer import ShardWriter, commit_dir, temp_dir_beside
from .plan import MergePlan
from .tokenizer import TOKENIZER_FILES, model_root


@dataclasses.dataclass
class MergeReport:
    """What a merge did: sizes, times, memory, and how many tensors each backend ran."""

    out_dir: str
    tensors: int
    bytes_read: int
    bytes_written: int
    wall_s: float
    merge_s: float  # time in backends
    peak_rss_mb: float
    backends: dict[str, int]

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in sorted(self.backends.items()))
        return (
            f"merged {self.tensors} tensors -> {self.out_dir}\n"
            f"  read {self.bytes_read / 1e6:.1f} MB, wrote {self.bytes_written / 1e6:.1f} MB in {self.wall_s:.2f} s "
            f"({self.gbps:.2f} GB/s of input; {self.merge_s:.2f} s in kernels)\n"
            f"  peak RSS {self.peak_rss_mb:.0f} MB; tensors per backend: {per}"
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


class _BufferPool:
    """Reused output buffers: no page faults on first touch after warm-up, bounded memory."""

    def __init__(self, nbytes: int, count: int = 2):
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8))

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self._free.get()
        n = 1
        for s in shape:
            n *= s
        view = raw[: n * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape)
        return raw, view

    def give(self, raw: torch.Tensor) -> None:
        self._free.put(raw)


class _RemapBuffers:
    """Buffers for remapped vocabulary rows, one per input slot that needs a copy (an input whose ids
    already match is used in place). Kept while consecutive tensors are remapped (``lm_head.weight`` and
    ``lm_head.bias``, or a tied pair), released before any other tensor: at most one buffer per input of
    the largest vocabulary tensor, and only while vocabulary tensors are being merged."""

    def __init__(self) -> None:
        self._raw: dict[int, torch.Tensor] = {}

    def _take(self, k: int, shape: tuple[int, ...], dtype: "torch.dtype") -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        raw = self._raw.get(k)
        if raw is None or raw.numel() < nbytes:
            raw = self._raw[k] = torch.empty(nbytes, dtype=torch.uint8)
        return raw[:nbytes].view(dtype).view(shape)

    def apply(self, remap: Any, tensors: list, compat: bool) -> list:
        return remap.apply(tensors, compat, out=self._take)

    def release(self) -> None:
        self._raw.clear()


class _WriteThread:
    """Writes finished tensors in plan order on its own thread, then gives their buffers back to the pool.

    An item is (event, [(name, view), ...], raw): ``event`` (or None) is waited for first - the GPU engine
    passes the CUDA event of the device-to-host copy - and ``raw`` (or None) goes back to the pool."""

    thread_name = "fastmerge-write"

    def __init__(self, writer: ShardWriter, pool: Any):
        self.writer, self.pool = writer, pool
        self.q: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            event, views, raw = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()
                    for name, view in views:
                        self.writer.write(name, view)
            except BaseException as e:
                self.error = e
            finally:
                if raw is not None:
                    self.pool.give(raw)

    def _enqueue(self, item: tuple[Any, list[tuple[str, Any]], Any]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def put(self, name: str, view: Any, raw: Any) -> None:
        """Queue one tensor (a torch view or a memoryview) for writing; ``raw`` returns to the pool after."""
        self._enqueue((None, [(name, view)], raw))

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            raise self.error


def _write_side_files(plan: MergePlan, tmp: Path) -> None:
    cfg = plan.config
    ref_root = plan.ref_root
    src_cfg = ref_root / "config.json"
    if src_cfg.is_file():
        doc = json.loads(src_cfg.read_text(encoding="utf-8"))
        out_dtype = cfg.out_dtype or cfg.dtype
        if out_dtype:
            keys = [k for k in ("torch_dtype", "dtype") if k in doc] or ["torch_dtype"]
            for k in keys:
                doc[k] = out_dtype
        if plan.out_layers is not None:  # slices: the output has its own number of layers
            for k in [k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in doc] or ["num_hidden_layers"]:
                doc[k] = plan.out_layers
        if plan.tokenizer is not None:  # the output vocabulary sets the embedding rows (mergekit's _update_config_vocab)
            nested = "vocab_size" not in doc and isinstance(doc.get("text_config"), dict) and "vocab_size" in doc["text_config"]
            (doc["text_config"] if nested else doc)["vocab_size"] = plan.tokenizer.n_rows
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if plan.tokenizer is not None:
        # tokenizer_source: always written, as mergekit saves the tokenizer it built whatever --copy-tokenizer says
        tok = plan.tokenizer
        for name in tok.files():
            if name in tok.rewritten:
                (tmp / name).write_text(tok.rewritten[name], encoding="utf-8")
            else:
                shutil.copyfile(tok.source / name, tmp / name)
    elif plan.options.copy_tokenizer:
        src = ref_root
        if cfg.tokenizer_source and cfg.tokenizer_source != "base":
            src = model_root(cfg.tokenizer_source)
            if not src.is_dir():
                raise FastMergeError(f"tokenizer_source: {src} is not a local model folder")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    import yaml

    (tmp / "fastmerge_config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


class OutputSession:
    """What every engine (this runner, ``fastpath``, ``gpu_runner``) shares around its merge loop.

    Entering: a temporary directory beside OUT, one reader per checkpoint (``reader_cls``: ``ModelReader``
    or the torch-free ``RawReader``), the prefetcher over the plan's tensor groups (``read_ahead_bytes``),
    the shard writer, the output buffer pool (``make_pool()``) and its writer thread (``writer_cls``), the
    progress bar. Leaving normally: the writer thread is drained, the index and side files are written
    and the directory is renamed to OUT. Leaving by an exception: everything is closed and the temporary
    directory removed (an ``OSError`` becomes one ``OutputError`` line). Nothing but a complete model is
    ever left at OUT."""

    def __init__(self, plan: MergePlan, out: Path, reader_cls: Any, make_pool: Any, read_ahead_bytes: int,
                 desc: str, writer_cls: Any = None):
        self.plan, self.out = plan, out
        self._args = (reader_cls, make_pool, read_ahead_bytes, desc, writer_cls or _WriteThread)
        self.tmp: Path | None = None
        self.prefetch: Prefetcher | None = None
        self.writer: ShardWriter | None = None
        self.wthread: Any = None
        self.pool: Any = None
        self.bar: Any = None
        self._readers: list[Any] = []
        self._t0 = time.perf_counter()

    def __enter__(self) -> "OutputSession":
        reader_cls, make_pool, read_ahead_bytes, desc, writer_cls = self._args
        plan = self.plan
        try:
            self.tmp = temp_dir_beside(self.out)
        except OSError as e:
            raise OutputError(f"{self.out.parent}: cannot create output directory ({e.strerror or e})") from None
        try:
            by_file: dict[Path, Any] = {}
            for ix in plan.indexes.values():
                reader = reader_cls(ix)
                self._readers.append(reader)
                for f in ix.files:
                    by_file.setdefault(f, reader)
            groups = [[(by_file[i.file], i) for i in ([t.base] if t.base is not None else []) + t.sources]
                      for t in plan.tensors]
            self.prefetch = Prefetcher(groups, budget_bytes=read_ahead_bytes)
            self.writer = ShardWriter(self.tmp, plan.shards)
            self.pool = make_pool()
            self.wthread = writer_cls(self.writer, self.pool)
            if plan.options.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=plan.in_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
        except BaseException as e:
            self._fail(e)
            raise
        return self

    def advance(self, nbytes: int) -> None:
        """Progress: ``nbytes`` more input merged."""
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.bar.n / (time.perf_counter() - self._t0) / 1e9:.2f} GB/s", refresh=False)

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
        self.writer.finalize()
        _write_side_files(self.plan, self.tmp)
        commit_dir(self.tmp, self.out, self.plan.options.overwrite)
        self._close_inputs()

    def _close_inputs(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()  # its thread holds views into the readers' mappings: stop it first
            self.prefetch = None
        for r in self._readers:
            r.close()
        self._readers.clear()

    def _fail(self, exc: BaseException) -> None:
        if self.wthread is not None:
            try:
                self.wthread.close()
            except BaseException:
                pass
            self.wthread = None
        if self.writer is not None:
            self.writer.abort()
        self._close_inputs()
        if self.bar is not None:
            self.bar.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            where = getattr(exc, "filename", None) or self.out
            raise OutputError(f"{where}: I/O error ({exc.strerror or exc}); nothing was left at {self.out}") from None


def execute(plan: MergePlan, out: str | Path) -> MergeReport:
    """Run ``plan`` and write the merged model to ``out`` (atomically: all or nothing)."""
    out = Path(out)
    t0 = time.perf_counter()
    opts = plan.options
    saved_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)  # restored below: a library call must not change the caller's torch
    try:
        return _execute(plan, out, t0)
    finally:
        torch.set_num_threads(saved_threads)


def _execute(plan: MergePlan, out: Path, t0: float) -> MergeReport:
    opts = plan.options
    merge_s = 0.0
    counts: dict[str, int] = {}
    largest = max((t.in_bytes for t in plan.tensors), default=0)
    out_bytes = max((t.out_tensor.nbytes for t in plan.tensors), default=1)
    with OutputSession(plan, out, ModelReader, lambda: _BufferPool(out_bytes), int(READ_AHEAD * largest),
                       f"fastmerge {plan.method.name}") as session:
        pool, prefetch = session.pool, session.prefetch
        remap_bufs = _RemapBuffers()
        for i, tensors in prefetch:
            tp = plan.tensors[i]
            if tp.compute_dtype:  # mergekit_compat: mergekit casts every input to the compute dtype at load
                cd = getattr(torch, tp.compute_dtype)  # float32 / float16 / bfloat16
                tensors = [x.to(cd) for x in tensors]
            if tp.input_transform is not None:  # tokenizer_source: rows moved to the output vocabulary
                tensors = remap_bufs.apply(tp.input_transform, tensors, opts.mergekit_compat)
            base = tensors[0] if tp.base is not None else None
            inputs = tensors[1:] if tp.base is not None else tensors
            raw, view = pool.take(tp.shape, getattr(torch, tp.out_dtype))
            job = MergeJob(tp.name, plan.method, tp.params, opts.mergekit_compat)
            ts = time.perf_counter()
            backend = backends.BACKENDS[tp.backend]
            if tp.backend == "torch":
                backend.run(job, view, inputs, base, opts.threads, device=plan.device)
            else:
                backend.run(job, view, inputs, base, opts.threads)
            merge_s += time.perf_counter() - ts
            counts[tp.backend] = counts.get(tp.backend, 0) + 1
            del inputs, base, tensors
            if i + 1 >= len(plan.tensors) or plan.tensors[i + 1].input_transform is None:
                remap_bufs.release()  # the next tensor is a plain one: no remap memory held through the layers
            prefetch.release(i)
            session.wthread.put(tp.name, view, raw)
            session.advance(tp.in_bytes)
    return MergeReport(
        out_dir=str(out), tensors=len(plan.tensors), bytes_read=plan.in_bytes, bytes_written=session.writer.bytes_written,
        wall_s=time.perf_counter() - t0, merge_s=merge_s, peak_rss_mb=peak_rss_mb(), backends=counts,
    )
