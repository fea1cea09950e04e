"""The per-tensor streaming loop on the CPU: read (reader thread) → merge (backend) → write (writer thread).

One loop, two I/O flavours:

- ``RawIO`` (engine ``native``): inputs are read-only mappings of the safetensors files
  (``io.reader.RawReader``), outputs two reused anonymous mappings, kernels called on raw pointers
  (``NativeBackend.run_raw``). It never imports torch: on the 2-core reference machine
  ``import torch`` takes 1.2-1.7 s, more than the whole native merge of the 1.3 GB benchmark family
  (bench/RESULTS.md), and adds ~265 MB of RSS. It runs a plan whose every tensor is on the native
  backend, read from safetensors, with no cast or vocabulary remap.
- ``TorchIO`` (engine ``torch``): torch views of the mapped files (``io.reader.SpanRawReader``; a run of
  small tensors, merged by the native kernels only, as the raw view RawIO reads), mergekit_compat's cast
  to the compute dtype, tokenizer_source's row remap, any CPU backend. It runs every CPU plan.

Peak host memory ≈ the current tensor group + one read-ahead group (1.25x the largest; input pages
are dropped after use, see io.reader) + two reused output buffers of the largest output tensor. It does
not grow with the number of tensors or the size of a shard. Both flavours write identical bytes (tested).
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .._lazy import torch_dtype
from .._memo import mapped_by_identity
from ..backends.base import MergeJob
from ..io.index import ITEMSIZE, index_in_own_order, neighbours_equal
from ..io.reader import RawReader, RawView, read_ahead_bytes, torch_view
from ..io.writer import greedy_cuts
from .session import MergeReport, RawPool, Session, TorchPool, peak_rss_mb, torch_threads


#: A tensor of fewer elements than this may share a batch with its neighbours (the torch-free flavour):
#: a MoE expert matrix of DeepSeek-V3's shape at hidden 64 is 2,048 elements, and there are 20k of them
#: per model (bench/bench_moe.py); at 2^16 elements (128 KB in bf16) a tensor's own kernel time (~30 us
#: at 4 KB) no longer dwarfs the ~150 us of Python and thread hand-offs a separate step costs.
SMALL_NUMEL = 1 << 16
#: A batch's output bytes at most: 1 MiB is ~260 expert matrices of 4 KB in one kernel call, one read of
#: each input's span and one writer item, while two pool buffers of it stay negligible next to the
#: read-ahead of a large tensor.
BATCH_BYTES = 1 << 20


def batches(plan: Any, elementwise: bool, segments: bool) -> list[Sequence[int]]:
    """The plan's tensors as runs of consecutive indices, each merged in one step: a run joins small
    tensors (< ``SMALL_NUMEL`` elements, ``BATCH_BYTES`` of output at most) whose inputs lie back to back
    in the same file of every model with the same dtypes, with one output dtype; where the kernel packs
    them into one call (``elementwise`` or ``segments``), also with equal parameters; all on the native
    backend, as read (no compute-dtype cast, no input transform). Every other tensor is a run of its own,
    and so is every tensor of a ``.bin`` checkpoint (no byte offsets)."""
    ts = plan.tensors
    if any(ix.fmt != "safetensors" for ix in plan.indexes.values()):
        return [range(i, i + 1) for i in range(len(ts))]
    if not ts:
        return []
    # Whether tensor i may join tensor i - 1's run, taken column by column (map and attrgetter: the loop in C;
    # a Python step per tensor, ~1.7 us, was ~0.035 s of a 20k-tensor merge). Equal neighbours make an equal
    # run: a run's members all have its first one's output dtype and parameters.
    cols = plan.columns  # (plan.PlanColumns: taken once, shared with the engine's choice and the digest)
    nbytes = cols.out_nbytes
    one_dtype = cols.one("out_dtype")  # (a column the plan knows holds one value: not read)
    dtypes = [one_dtype] if one_dtype is not cols.VARIES else cols.out_dtype
    limit = {d: SMALL_NUMEL * ITEMSIZE[d] for d in set(dtypes)}
    if _native_as_read(cols):
        small = (list(map(limit[one_dtype].__gt__, nbytes)) if one_dtype is not cols.VARIES
                 else list(map(operator.lt, nbytes, map(limit.__getitem__, dtypes))))
    else:
        small = [n < limit[t.out_dtype] and t.backend == "native" and t.input_transform is None
                 and t.out_quant is None and not t.compute_dtype for t, n in zip(ts, nbytes)]
    # each condition is first compared as a whole list (one C call: a model of one dtype, read from its files in
    # file order, has every neighbour equal), and element by element only where that fails
    join = list(map(operator.and_, small[1:], small)) if not all(small) else [True] * (len(ts) - 1)
    if one_dtype is cols.VARIES:
        _and(join, neighbours_equal(dtypes))
    if (elementwise or segments) and cols.one("params") is cols.VARIES:
        params = cols.params
        ids = list(map(id, params))
        if ids[1:] != ids[:-1]:
            _and(join, [a is b or a == b for a, b in zip(params[1:], params)])
    _and(join, _inputs_adjacent(plan))
    # Each stretch of joinable neighbours cut greedily into runs of at most BATCH_BYTES of output (a step per run, not
    # per tensor: that was ~6 ms of a 20k-tensor merge)
    n = len(ts)
    ends = list(itertools.accumulate(nbytes))
    starts = [0, *itertools.compress(range(1, n), map(operator.not_, join)), n]
    # (ranges: a list of 20k-45k index ints was ~1 ms)
    return [range(a, b) for lo, hi in zip(starts, starts[1:]) for a, b in greedy_cuts(ends, BATCH_BYTES, lo, hi)]


_BEGIN, _END = operator.attrgetter("begin"), operator.attrgetter("end")
_DTYPE, _FILE, _SHAPE, _NAME = (operator.attrgetter(a) for a in ("dtype", "file", "shape", "name"))
_FIRST = operator.itemgetter(0)


def _native_as_read(cols: Any) -> bool:
    """Every tensor on the native backend, as read: no compute-dtype cast, re-quantisation or input transform
    (``cols``: the plan's ``PlanColumns``)."""
    one, varies = cols.one, cols.VARIES
    return ((one("backend") == "native" if one("backend") is not varies else set(cols.backend) == {"native"})
            and all(one(k) is None if one(k) is not varies else not any(getattr(cols, k))
                    for k in ("input_transform", "out_quant", "compute_dtype")))


def _and(acc: list[bool], other: list[bool] | None) -> None:
    """``acc[i] = acc[i] and other[i]``, in place; ``other`` None: all true."""
    if other is not None:
        acc[:] = map(operator.and_, acc, other)


def _inputs_adjacent(plan: Any) -> list[bool] | None:
    """For each tensor after the first: whether each of its inputs starts where the previous tensor's input of
    the same model ends, in the same file and dtype (and both have as many inputs); None: all do."""
    ts, cols = plan.tensors, plan.columns
    inputs = cols.inputs
    if inputs is None:  # inputs that differ in number
        ins = [s if b is None else [b, *s] for b, s in zip(cols.base, cols.sources)]
        return [len(a) == len(b) and all(x.end == y.begin and x.dtype == y.dtype and (x.file is y.file or x.file == y.file)
                                         for x, y in zip(a, b)) for a, b in zip(ins, ins[1:])]
    out = [True] * (len(ts) - 1)
    for col in inputs:
        ix = index_in_own_order(col, plan.indexes.values())
        if ix is not None:  # a model's tensors in its own order: its checked layout says
            _and(out, ix.neighbours[1])
            continue
        ends, begins = list(map(_END, col)), list(map(_BEGIN, col))
        if ends[:-1] != begins[1:]:
            _and(out, list(map(operator.eq, ends, begins[1:])))
        _and(out, neighbours_equal(list(map(_DTYPE, col))))
        files = list(map(_FILE, col))
        if list(map(id, files[1:])) != list(map(id, files[:-1])):  # (Path == is ~1 us: identity first)
            _and(out, [a is b or a == b for a, b in zip(files[1:], files)])
    return None if all(out) else out


def unit_bytes(tensors: Sequence[Any], unit: Sequence[int]) -> tuple[int, int]:
    """(input bytes, output bytes) of a unit of ``batches``: a run's inputs lie back to back, so each input
    is one span from its first tensor's start to its last one's end (not a sum over 20k tensors)."""
    first = tensors[unit[0]]
    if len(unit) == 1:
        return first.in_bytes, first.out_tensor.nbytes
    last = tensors[unit[-1]]
    a = [first.base, *first.sources] if first.base is not None else first.sources
    b = [last.base, *last.sources] if last.base is not None else last.sources
    n_in = sum(y.end - x.begin for x, y in zip(a, b))
    # same output dtype through the run: its elements are the first input's span's
    numel = (b[0].end - a[0].begin) // ITEMSIZE[a[0].dtype]
    return n_in, numel * ITEMSIZE[first.out_dtype]


def run_offsets(tps: list[Any]) -> list[int]:
    """Where each tensor of a run starts in the packed buffers, in elements, and where the last ends (each distinct
    shape object's size taken once: a run of 250 experts has 3; ``math.prod`` per tensor was ~2.8 ms of 20k)."""
    return list(itertools.accumulate(mapped_by_identity(list(map(_SHAPE, tps)), _numel), initial=0))


def _numel(shape: tuple[int, ...], i: int) -> int:
    return math.prod(shape)


def merge_run(plan: Any, native: Any, tps: list[Any], spans: list[Any], out: Any, offsets: list[int]) -> None:
    """Merge the run ``tps`` (``batches``) into ``out`` from one span per input (base first when the
    tensors have one): packed buffers of raw views or 1-D torch tensors. One kernel call where the method
    is elementwise or has a segments kernel, else one call per tensor on its part of the buffers."""
    tp0 = tps[0]
    base = spans[0] if tp0.base is not None else None
    inputs = spans[1:] if tp0.base is not None else spans
    threads, method, kernel = plan.options.threads, plan.method, plan.method.native
    if kernel.elementwise:
        native.run_raw(MergeJob(tp0.name, method, tp0.params, False), out, inputs, base, threads)
    elif kernel.segments is not None:
        try:
            kernel.segments(method, tp0.params, out, inputs, base, threads, offsets)
        except ValueError as e:
            raise ValueError(f"tensors '{tp0.name}' .. '{tps[-1].name}': {e}") from None
    else:
        for tp, a, b in zip(tps, offsets, offsets[1:]):
            native.run_raw(MergeJob(tp.name, method, tp.params, False), _part(out, a, b),
                           [_part(x, a, b) for x in inputs], _part(base, a, b), threads, shape=tp.shape)


class RunViews(Sequence):
    """A run's outputs as (name, view) pairs, each view made when asked for: the writer needs only ``names``
    (it writes the run's bytes in one piece, ``ShardWriter.write_run``), and a view only to name a tensor
    that holds inf/NaN. Making them all took ~7 us a tensor as torch views (0.15 s for 20k tensors)."""

    __slots__ = ("names", "_tps", "_offsets", "_view")

    def __init__(self, tps: list[Any], offsets: list[int], view: Callable[[int, int, tuple[int, ...]], Any]):
        self.names = list(map(_NAME, tps))
        self._tps, self._offsets, self._view = tps, offsets, view

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.names[k], self._view(self._offsets[k], self._offsets[k + 1], self._tps[k].shape)


def _part(v: Any, a: int, b: int) -> Any:
    """Elements [a, b) of a packed buffer: a raw view or a 1-D torch tensor."""
    if v is None:
        return None
    if not isinstance(v, RawView):
        return v[a:b]
    size = ITEMSIZE[v.dtype]
    return RawView(v.ptr + a * size, (b - a) * size, v.dtype, b - a)


def _raw_reasons(plan: Any, native: Any, tp: Any, asked: dict[tuple[int, str, str], list[str]]) -> list[str]:
    """Why the native kernel's raw path cannot merge planned tensor ``tp`` (``raw_reasons``; empty: it can), asked once
    per (Params, input dtype, output dtype) and kept in ``asked``: every Params stays alive in the plan, and a MoE
    model of 20k-45k tensors has a few such keys."""
    src = tp.sources[0] if tp.sources else tp.base
    key = (id(tp.params), src.dtype, tp.out_dtype)
    why = asked.get(key)
    if why is None:
        why = asked[key] = native.raw_reasons(MergeJob(tp.name, plan.method, tp.params, False), tp)
    return why


class RawIO:
    """Torch-free flavour: mapped inputs, anonymous-memory outputs, ``run_raw``."""

    name = "native"
    reader = RawReader

    @staticmethod
    def not_supported_reasons(plan: Any) -> list[str]:
        from ..backends import BACKENDS

        if os.environ.get("FASTMERGE_FASTPATH", "1") == "0":
            return ["FASTMERGE_FASTPATH=0"]
        if not RawReader.available():
            return ["no POSIX mmap/madvise here"]
        if plan.device != "cpu":
            return [f"device {plan.device}"]
        if any(ix.fmt != "safetensors" for ix in plan.indexes.values()):
            return ["a .bin checkpoint (read through torch.load)"]
        native = BACKENDS["native"]
        ts, cols = plan.tensors, plan.columns
        asked: dict[tuple[int, str, str], list[str]] = {}  # _raw_reasons' answers: a MoE model asks a few questions
        if ts and _native_as_read(cols) and all(srcs := cols.sources):
            # every tensor as read with one Params, input dtype and output dtype (a MoE model of 20k-45k tensors, found
            # column by column, without a tuple per tensor: those set off collections over the whole plan): one question
            if all(cols.one(k) is not cols.VARIES for k in ("params", "in_dtype", "out_dtype")):
                one_question = True  # (known as the plan was built)
            else:
                ids, dts, ods = list(map(id, cols.params)), list(map(_DTYPE, map(_FIRST, srcs))), cols.out_dtype
                one_question = ids[1:] == ids[:-1] and dts[1:] == dts[:-1] and ods[1:] == ods[:-1]
            if one_question:
                why = _raw_reasons(plan, native, ts[0], asked)
                return [f"tensor '{ts[0].name}': {why[0]}"] if why else []
        for t in ts:
            if t.compute_dtype:
                return ["mergekit_compat casts inputs to the compute dtype"]
            if t.backend != "native":
                return [f"tensor '{t.name}' runs on {t.backend}"]
            if t.out_quant is not None:
                return [f"tensor '{t.name}' is re-quantised to {t.out_dtype}"]
            if t.input_transform is not None:  # tokenizer_source's row remap, a model+lora input's LoRA update
                raw_why = getattr(t.input_transform, "raw_reasons", None)  # FP8 inputs: read by the kernels (io.fp8)
                if raw_why is None:
                    return [f"tensor '{t.name}' has {getattr(t.input_transform, 'describe', 'a vocabulary remap')}"]
                if raw_why():
                    return [f"tensor '{t.name}': {raw_why()[0]}"]
            why = _raw_reasons(plan, native, t, asked)
            if why:
                return [f"tensor '{t.name}': {why[0]}"]
        return []

    def __init__(self, plan: Any):
        from ..backends import BACKENDS

        self.plan, self.native = plan, BACKENDS["native"]
        self.kernel = plan.method.native

    def pool(self, nbytes: int) -> RawPool:
        return RawPool(nbytes)

    def units(self) -> list[list[int]]:
        return batches(self.plan, self.kernel.elementwise, self.kernel.segments is not None)

    def merge_batch(self, tps: list[Any], spans: list[RawView], pool: RawPool) -> tuple[Any, Any, str]:
        """Merge the run ``tps`` from one span per input into one pool buffer (``merge_run``): (the buffer,
        the outputs as (name, bytes) pairs, the bytes of them all)."""
        offsets = run_offsets(tps)
        osize = ITEMSIZE[tps[0].out_dtype]
        raw, view, mv = pool.take(offsets[-1] * osize, tps[0].out_dtype)
        merge_run(self.plan, self.native, tps, spans, view, offsets)
        whole = mv[:offsets[-1] * osize]
        return raw, RunViews(tps, offsets, lambda a, b, shape: whole[a * osize:b * osize]), whole

    def merge(self, tp: Any, tensors: list[Any], pool: RawPool) -> tuple[Any, Any, str]:
        if tp.input_transform is not None:  # FP8 inputs: the FP8 bytes and scales, dequantised by the kernels' load step
            tensors = tp.input_transform.sources(tensors)
        base = tensors[0] if tp.base is not None else None
        inputs = tensors[1:] if tp.base is not None else tensors
        raw, view, mv = pool.take(tp.out_tensor.nbytes, tp.out_dtype)
        job = MergeJob(tp.name, self.plan.method, tp.params, False)
        self.native.run_raw(job, view, inputs, base, self.plan.options.threads, shape=tp.shape)
        return raw, mv, "native"

    def next_tensor(self, i: int) -> None:
        pass


class TorchIO:
    """Torch flavour: torch views, compute-dtype casts and vocabulary remaps, any CPU backend."""

    name = "torch"
    reader = None  # io.reader.SpanRawReader, imported with torch

    @staticmethod
    def not_supported_reasons(plan: Any) -> list[str]:
        return [f"device {plan.device}: the GPU engine runs it"] if plan.device != "cpu" else []

    def __init__(self, plan: Any):
        from ..backends import BACKENDS
        from ..io.reader import SpanRawReader

        self.plan, self.backends = plan, BACKENDS
        self.reader = SpanRawReader
        self.remap = _RemapBuffers()
        self._raw_asked: dict[tuple[int, str, str], list[str]] = {}  # _raw_reasons' answers
        cols = plan.columns
        self._one_params = cols.one("params") is not cols.VARIES  # every tensor's Params the same object

    def pool(self, nbytes: int) -> TorchPool:
        return TorchPool(nbytes)

    def units(self) -> list[list[int]] | None:
        k = self.plan.method.native
        if not RawReader.available():  # spans are read through a mapping of their own (io.reader.SpanRawReader)
            return None
        return batches(self.plan, k is not None and k.elementwise, k is not None and k.segments is not None)

    def merge_batch(self, tps: list[Any], spans: list[Any], pool: TorchPool) -> tuple[Any, Any, str]:
        """``RawIO.merge_batch`` on the spans (raw views: ``io.reader.SpanRawReader``) into a pool tensor, through a
        raw view of it where the kernel's raw path takes the run, else on torch views of both (a passthrough that
        converts dtypes or scales: its torch path); the outputs as (name, view of its shape) pairs."""
        offsets = run_offsets(tps)
        tp0, native = tps[0], self.backends["native"]
        raw, view = pool.take((offsets[-1],), torch_dtype(tp0.out_dtype))
        # the raw path where it takes every tensor: a kernel run per tensor may have a run of several Params (a
        # passthrough scale gradient: scale 1 a byte copy, any other a multiply on its torch path)
        # (a plan of one Params, as its builder knows: the run's first tensor asks for all; a dict of the run's Params
        # was ~15 us a run of 250)
        if self._takes_raw(tp0) if self._one_params else all(map(self._takes_raw, {id(tp.params): tp for tp in tps}.values())):
            out = RawView(view.data_ptr(), offsets[-1] * view.element_size(), tp0.out_dtype, offsets[-1])
            merge_run(self.plan, native, tps, spans, out, offsets)
        else:
            merge_run(self.plan, native, tps, [s if not isinstance(s, RawView) else torch_view(s) for s in spans], view, offsets)
        return raw, RunViews(tps, offsets, lambda a, b, shape: view[a:b].view(shape)), view

    def _takes_raw(self, tp: Any) -> bool:
        """Whether the native kernel's raw path merges planned tensor ``tp`` (``raw_reasons`` empty), asked once per
        (Params, input dtype, output dtype): every Params stays alive in the plan."""
        return not _raw_reasons(self.plan, self.backends["native"], tp, self._raw_asked)

    def merge(self, tp: Any, tensors: list[Any], pool: TorchPool) -> tuple[Any, Any, str]:

        opts = self.plan.options
        tr = tp.input_transform
        if getattr(tr, "before_cast", False):  # FP8 inputs: dequantised first (io.fp8), then any row map / LoRA
            tensors, tr = self.remap.apply(tr, tensors, opts.mergekit_compat), None
        if tp.compute_dtype:  # mergekit_compat: mergekit casts every input to the compute dtype at load
            cd = torch_dtype(tp.compute_dtype)
            tensors = [x.to(cd) for x in tensors]
        if tr is not None:  # tokenizer_source: rows moved to the output vocabulary
            tensors = self.remap.apply(tr, tensors, opts.mergekit_compat)
        base = tensors[0] if tp.base is not None else None
        inputs = tensors[1:] if tp.base is not None else tensors
        job = MergeJob(tp.name, self.plan.method, tp.params, opts.mergekit_compat)
        if tp.out_quant is not None:  # out_dtype float8_e4m3fn: merged in fp32, re-quantised, scales after it
            from .._lazy import torch

            acc = torch.empty(tp.shape, dtype=torch.float32)
            self.backends[tp.backend].run(job, acc, inputs, base, opts.threads)
            q, scale = tp.out_quant.quantize(acc)
            return None, [(tp.name, q), (tp.out_quant.scale_name, scale)], tp.backend
        raw, view = pool.take(tp.shape, torch_dtype(tp.out_dtype))
        self.backends[tp.backend].run(job, view, inputs, base, opts.threads)
        return raw, view, tp.backend

    def next_tensor(self, i: int) -> None:
        tensors = self.plan.tensors
        if i + 1 >= len(tensors) or tensors[i + 1].input_transform is None:
            self.remap.release()  # the next tensor is a plain one: no remap memory held through the layers


class _RemapBuffers:
    """Buffers for remapped vocabulary rows, one per input slot that needs a copy (an input whose ids
    already match is used in place). Kept while consecutive tensors are remapped (``lm_head.weight`` and
    ``lm_head.bias``, or a tied pair), released before any other tensor: at most one buffer per input of
    the largest vocabulary tensor, and only while vocabulary tensors are being merged."""

    def __init__(self) -> None:
        self._raw: dict[int, Any] = {}

    def _take(self, k: int, shape: tuple[int, ...], dtype: Any) -> Any:
        from .._lazy import torch

        n = 1
        for d in shape:
            n *= d
        nbytes = n * dtype.itemsize
        raw = self._raw.get(k)
        if raw is None or raw.numel() < nbytes:
            raw = self._raw[k] = torch.empty(nbytes, dtype=torch.uint8)
        return raw[:nbytes].view(dtype).view(shape)

    def apply(self, remap: Any, tensors: list, compat: bool) -> list:
        return remap.apply(tensors, compat, out=self._take)

    def release(self) -> None:
        self._raw.clear()


FLAVOURS = {"native": RawIO, "torch": TorchIO}


def execute(plan: Any, out: str | Path, flavour: str = "torch") -> MergeReport:
    """Run ``plan`` through the streaming loop with the I/O ``flavour`` ("torch" or "native": see the
    module docstring) and write ``out`` atomically. A plan the flavour cannot run is a ValueError."""
    io = FLAVOURS[flavour]
    why = io.not_supported_reasons(plan)
    if why:
        raise ValueError(f"stream.execute: the {flavour} flavour cannot run this plan ({why[0]})")
    return run(plan, out, io)


def run(plan: Any, out: str | Path, flavour: type[RawIO] | type[TorchIO]) -> MergeReport:
    """Run ``plan`` through the streaming loop with the I/O ``flavour`` and write ``out`` atomically."""
    t0 = time.perf_counter()
    io = flavour(plan)
    merge_s = 0.0
    counts: dict[str, int] = {}
    units = io.units()
    runs = [[i] for i in range(len(plan.tensors))] if units is None else units
    sizes = [unit_bytes(plan.tensors, u) for u in runs]
    in_bytes = [a for a, _ in sizes]
    largest = max(in_bytes, default=0)
    out_bytes = max((b for _, b in sizes), default=1)
    with torch_threads(plan.options.threads if flavour is TorchIO else 0), \
            Session(plan, out, reader=io.reader, pool=lambda: io.pool(out_bytes), units=units,
                    read_ahead_bytes=read_ahead_bytes(largest), desc=f"fastmerge {plan.method.name}") as s:
        for k, tensors in s.prefetch:
            idx = runs[k]
            ts = time.perf_counter()
            whole = None
            if len(idx) == 1:
                tp = plan.tensors[idx[0]]
                raw, written, backend = io.merge(tp, tensors, s.pool)
            else:
                tp = plan.tensors[idx[0]]
                raw, written, packed = io.merge_batch(plan.tensors[idx[0]:idx[-1] + 1], tensors, s.pool)  # a run: consecutive
                backend, whole = "native", (packed, tp.out_dtype)
            merge_s += time.perf_counter() - ts
            counts[backend] = counts.get(backend, 0) + len(idx)
            del tensors
            io.next_tensor(idx[-1])
            s.prefetch.release(k)
            if isinstance(written, (list, RunViews)):  # a batch, or a weight and its FP8 scales
                s.put_many(written, raw, whole=whole)
            else:
                s.put(tp.name, written, raw)
            s.advance(in_bytes[k])
    return MergeReport(
        out_dir=str(out), tensors=len(plan.tensors), bytes_read=sum(in_bytes), bytes_written=s.bytes_written,
        wall_s=time.perf_counter() - t0, merge_s=merge_s, peak_rss_mb=peak_rss_mb(), backends=counts,
        engine=flavour.name,
    )
