"""Streaming reads: read-only CPU views of input tensors, prefetched in file order on a background thread.

Tensors of a safetensors file are zero-copy views into one read-only mapping of the file per reader
(``RawReader``: ``PROT_READ``, so a stray write faults instead of changing an input), found from the header
offsets the index already validated; for a reader that never drops pages (``ModelReader(mapped=False)``) or
without ``mmap`` they come from the safetensors library (``safe_open``), and for ``.bin`` from
``torch.load(mmap=True, weights_only=True)``. They are read-only by contract: nothing
here or in any backend writes to them.

Bounded memory: a mapped file page counts in RSS once touched, so merging a model whose shard is 5 GB
would otherwise grow RSS by 5 GB per model. The prefetcher populates the page tables of the next group
ahead of use (``MADV_POPULATE_READ``, so the page-fault cost, ~5 GB/s here, overlaps the merge of the
current group) and drops them after use (``MADV_DONTNEED``: pages of an unmodified file mapping are
simply re-read from the page cache if ever touched again). Both are applied only to this reader's own mapping
or to address ranges that ``/proc/self/maps`` shows belong to the file's mapping, never to heap memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import mmap
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

from .._lazy import torch
from ..errors import CheckpointError
from .index import CheckpointIndex, TensorInfo

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux >= 5.14; older kernels answer EINVAL and we fall back to WILLNEED

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # non-Linux: no page management, still correct
    _libc = None

_populate_ok = True


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """(major, minor, inode) of ``path``, as /proc/self/maps prints them."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _file_mappings(file_id: tuple[int, int, int] | None) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the file ``file_id`` (Linux); [] elsewhere.

    Matched by device and inode, not by path: a path can be renamed or deleted (a concurrent cleanup
    of a temp folder) while the mapping lives on, shown as "(deleted)"."""
    if file_id is None:
        return []
    out: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps", "r") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or parts[4] != str(file_id[2]):
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                if (major, minor) == file_id[:2]:
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except (OSError, ValueError):
        return []
    return out


def _madvise(lo: int, hi: int, advice: int) -> bool:
    start = lo - lo % _PAGE
    length = hi - start
    if _libc is None or length <= 0:
        return False
    return _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0


@dataclasses.dataclass(frozen=True)
class SpanInfo(TensorInfo):
    """Consecutive tensors of one file and dtype read as one 1-D tensor (named after the first): the
    engine's runs of small tensors (``engine.stream.batches``)."""


def span(first: TensorInfo, last: TensorInfo) -> TensorInfo:
    """The tensors from ``first`` to ``last`` of one file, which lie back to back (the caller checked)
    with ``first``'s dtype, as one ``SpanInfo``; ``first`` itself when it is ``last``."""
    if last is first:
        return first
    from .index import ITEMSIZE

    return SpanInfo(first.name, first.file, first.dtype, ((last.end - first.begin) // ITEMSIZE[first.dtype],),
                    first.begin, last.end)


class ModelReader:
    """Opens one checkpoint's files lazily and returns read-only views.

    ``mapped`` (the engines, whose prefetcher drops each group's pages after use): safetensors files are read
    through one read-only mapping each, kept until ``close()``. ``mapped=False`` (a caller that reads without
    dropping, e.g. a soup over many shards): through ``safe_open`` handles, at most ``max_open`` at once, whose views
    keep their own mapping alive and let it go with the last of them, so a long read holds only recent files."""

    def __init__(self, index: CheckpointIndex, max_open: int = 4, mapped: bool = True):
        self.index = index
        self.max_open = max_open
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._maps: dict[Path, list[tuple[int, int]]] = {}
        self._ids: dict[Path, tuple[int, int, int] | None] = {}
        self._raw: RawReader | None = None  # one read-only mapping per file, as the torch-free reader
        #: safetensors tensors are read through ``_raw`` (``get``); .bin ones, or where no mapping can be made, through
        #: ``_handle``
        self._own_map = mapped and index.fmt == "safetensors" and RawReader.available()

    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is not None:
            self._handles.move_to_end(file)
            return h
        try:
            if self.index.fmt == "safetensors":
                from safetensors import safe_open

                h = safe_open(str(file), framework="pt", device="cpu")
            else:
                h = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot open ({type(e).__name__}: {e})".split("\n")[0]) from None
        self._handles[file] = h
        self._ids[file] = _file_id(file)  # taken when opened: the identity of what is mapped
        self._maps.pop(file, None)
        while len(self._handles) > self.max_open:
            old, _ = self._handles.popitem(last=False)
            self._maps.pop(old, None)
        return h

    def _mapping(self) -> RawReader:
        """This reader's own read-only mapping of its files, made on first use."""
        if self._raw is None:
            self._raw = RawReader(self.index)
        return self._raw

    def get(self, info: TensorInfo) -> torch.Tensor:
        """A read-only CPU view of tensor ``info`` (never write to it). From a safetensors file: a view into this
        reader's own read-only mapping of the file (``RawReader``), a ``SpanInfo`` as one 1-D view of its bytes
        (safetensors' views cannot be joined: each has its own storage). ``safe_open`` parsed the whole header
        again on the first read of each file (~15 ms for a MoE shard of 20k entries, per file and merge) and its
        views' mappings had to be looked up in /proc/self/maps to be populated or dropped."""
        if self._own_map or isinstance(info, SpanInfo):
            t = torch_view(self._mapping().get(info))
            if isinstance(info, SpanInfo):
                return t
            if t.numel() != math.prod(info.shape):  # an info that is not this file's header's (the parse checks it)
                raise CheckpointError(f"{info.file}: tensor '{info.name}' changed shape since the header was read")
            return t.view(info.shape)
        h = self._handle(info.file)
        try:
            t = h.get_tensor(info.name) if self.index.fmt == "safetensors" else h[info.name]
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{info.name}' ({e})".split("\n")[0]) from None
        if tuple(t.shape) != info.shape:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' changed shape since the header was read")
        return t

    def _mapped_range(self, info: TensorInfo, t: torch.Tensor) -> tuple[int, int] | None:
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if self._own_map or isinstance(info, SpanInfo):  # inside this reader's own mapping of the file (get): no need to look it up in
            # /proc/self/maps (~1 ms a read, 2 per input per tensor); anything else (heap memory) is never advised
            return (lo, hi) if self._raw is not None and self._raw.holds(info.file, lo, hi) else None
        maps = self._maps.get(info.file)
        if maps is None or not any(a <= lo and hi <= b for a, b in maps):
            maps = self._maps[info.file] = _file_mappings(self._ids.get(info.file))
        return (lo, hi) if any(a <= lo and hi <= b for a, b in maps) else None

    def populate(self, info: TensorInfo, t: torch.Tensor) -> None:
        """Fault in the pages of ``t`` now (on the prefetch thread), so the merge does not stall on them."""
        global _populate_ok
        r = self._mapped_range(info, t)
        if r is None:
            return
        if _populate_ok and not _madvise(r[0], r[1], _MADV_POPULATE_READ):
            _populate_ok = False
        if not _populate_ok:
            _madvise(r[0], r[1], _MADV_WILLNEED)

    def drop(self, info: TensorInfo, t: torch.Tensor) -> None:
        """Release the pages of ``t`` from this process (they stay in the page cache)."""
        r = self._mapped_range(info, t)
        if r is not None:
            _madvise(r[0], r[1], _MADV_DONTNEED)

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()
        if self._raw is not None:
            self._raw.close()
            self._raw = None


def torch_view(v: RawView) -> torch.Tensor:
    """A 1-D torch view of raw view ``v``'s bytes, in its dtype: no copy (a read-only mapping stays read-only: a stray
    write faults); an empty tensor for no bytes (torch.frombuffer refuses an empty buffer)."""
    if v.nbytes == 0:
        return torch.empty(0, dtype=getattr(torch, v.dtype))
    buf = (ctypes.c_char * v.nbytes).from_address(v.ptr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(getattr(torch, v.dtype))


class SpanRawReader(ModelReader):
    """``ModelReader`` whose spans (``SpanInfo``: the torch engine's runs of small tensors, which only the native
    kernels merge, ``engine.stream.merge_run``) are raw views of its mapping (``RawView``), as the torch-free engine
    reads them; single tensors stay torch views. A torch view of a span cost ~12 us of the read-ahead thread (~40 us of
    CPU inside a merge, under the GIL; 960 spans in a 20k-tensor merge), a raw view ~1.4 us."""

    def get(self, info: TensorInfo) -> Any:
        return self._mapping().get(info) if isinstance(info, SpanInfo) else super().get(info)

    def populate(self, info: TensorInfo, t: Any) -> None:
        if isinstance(t, RawView):
            self._raw.populate(info, t)
        else:
            super().populate(info, t)

    def drop(self, info: TensorInfo, t: Any) -> None:
        if isinstance(t, RawView):
            self._raw.drop(info, t)
        else:
            super().drop(info, t)


_PROT_READ, _MAP_SHARED = 1, 1
if _libc is not None:
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.mmap.restype = ctypes.c_void_p
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclasses.dataclass(frozen=True)
class RawView:
    """Where one input tensor's bytes are mapped: ``nbytes`` read-only bytes at address ``ptr``."""

    ptr: int
    nbytes: int
    dtype: str
    numel: int


class RawReader:
    """``ModelReader`` without torch or safetensors: each safetensors file is mapped read-only
    (``PROT_READ``: a write through a bad pointer faults instead of corrupting an input) and tensors
    are addresses into the mapping, found from the header offsets the index already validated.

    Used by the torch-free native fast path (``fastmerge.fastpath``); same ``get``/``populate``/``drop``
    interface as ``ModelReader``, so the same ``Prefetcher`` drives both. Linux/POSIX only
    (``available()``); files stay mapped until ``close()`` (address space only: pages are dropped
    after use)."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._maps: dict[Path, tuple[int, int]] = {}  # file -> (address, length)
        self._held: tuple[int, int] | None = None  # pages released by drop, not yet dropped (DROP_BATCH)

    @staticmethod
    def available() -> bool:
        return _libc is not None and os.name == "posix"

    def _map(self, file: Path) -> int:
        m = self._maps.get(file)
        if m is not None:
            return m[0]
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot open ({e.strerror or e})") from None
        try:
            length = os.fstat(fd).st_size
            addr = _libc.mmap(None, max(length, 1), _PROT_READ, _MAP_SHARED, fd, 0)
        finally:
            os.close(fd)  # the mapping keeps the file alive
        if addr is None or addr == _MAP_FAILED:
            raise CheckpointError(f"{file}: cannot map ({os.strerror(ctypes.get_errno())})")
        self._maps[file] = (addr, length)
        return addr

    def get(self, info: TensorInfo) -> RawView:
        addr = self._map(info.file)
        if info.end > self._maps[info.file][1]:  # the file shrank since its header was read
            raise CheckpointError(f"{info.file}: tensor '{info.name}' lies past the end of the file")
        return RawView(addr + info.begin, info.nbytes, info.dtype, info.numel)

    def holds(self, file: Path, lo: int, hi: int) -> bool:
        """Whether the addresses ``[lo, hi)`` (not empty) lie in this reader's mapping of ``file``."""
        m = self._maps.get(file)
        return m is not None and m[0] <= lo < hi <= m[0] + m[1]

    def populate(self, info: TensorInfo, v: RawView) -> None:
        global _populate_ok
        if _populate_ok and not _madvise(v.ptr, v.ptr + v.nbytes, _MADV_POPULATE_READ):
            _populate_ok = False
        if not _populate_ok:
            _madvise(v.ptr, v.ptr + v.nbytes, _MADV_WILLNEED)

    def drop(self, info: TensorInfo, v: RawView) -> None:
        # _madvise rounds the start down to a page, so the partial pages at both ends go too: harmless,
        # an unmodified page of a shared file mapping is re-read from the page cache if touched again.
        # A range that continues the last one dropped joins it, dropped at DROP_BATCH bytes: a run of small tensors
        # reads ~1 MB a model, and each call's page-table teardown interrupts the other core (an IPI, costly on a VM)
        lo, hi = v.ptr, v.ptr + v.nbytes
        held = self._held
        if held is not None and held[1] == lo:
            lo = held[0]
        elif held is not None:
            _madvise(held[0], held[1], _MADV_DONTNEED)
        if hi - lo >= DROP_BATCH:
            _madvise(lo, hi, _MADV_DONTNEED)
            self._held = None
        else:
            self._held = (lo, hi)

    def close(self) -> None:
        self._held = None  # (unmapped below, pages and all)
        for addr, length in self._maps.values():
            _libc.munmap(addr, max(length, 1))
        self._maps.clear()


#: ``RawReader.drop``: consecutive released ranges of one model are dropped together once they reach this many bytes
#: (a model's pages mapped beyond the read-ahead: at most this much).
DROP_BATCH = 8 << 20

#: Read-ahead budget, as a multiple of the largest tensor group. 1.25: while the largest group (the
#: embedding or lm_head of every model: 4 x 65.5 MB on the bf16 benchmark family) is merged, a normal
#: group (a 4 x 5.8 MB MLP matrix) still fits, and vice versa, so reading overlaps merging everywhere but
#: between two giant adjacent groups; 2.0 kept both giants mapped at once, 1.6x the resident input pages
#: (peak RSS of task_arithmetic on that family: 594 MB at 2.0).
READ_AHEAD = 1.25
#: ... and never less than 32 MiB. Where the largest group is a few MB (a MoE model's runs of small experts, 3-4 MB of
#: input on bench_moe.py's families), 1.25x it kept the reader one group ahead, in step with the merge, which then
#: waited on each page-table fill: 0.12 of 0.45 s of a merge of 20k tensors of 16 KB, 0.5 of 1.8 s at 64 KB; at
#: 32 MiB those waits are 0.002-0.01 s. A bound on memory still: 32 MiB of input pages beyond the group in use.
READ_AHEAD_MIN = 32 << 20


def read_ahead_bytes(largest: int, factor: float = READ_AHEAD) -> int:
    """The prefetcher's budget for groups of at most ``largest`` bytes: ``factor`` times that, at least
    ``READ_AHEAD_MIN``."""
    return max(int(factor * largest), READ_AHEAD_MIN)


class Prefetcher:
    """Yields the tensors of each group in order, read ahead by a background thread.

    ``groups`` is a sequence of lists of ``(reader, info)``. At most ``budget_bytes`` of tensors (but
    always at least one whole group) are read ahead of the consumer. The consumer calls ``release(i)``
    when it has finished with group ``i``; its pages are then dropped.
    """

    def __init__(self, groups: Sequence[Sequence[tuple[ModelReader, TensorInfo]]], budget_bytes: int):
        self.groups = groups
        self.budget = budget_bytes
        self._inflight = 0
        self._cv = threading.Condition()
        self._q: queue.Queue[Any] = queue.Queue()
        self._stop = False
        self._loaded: dict[int, list[torch.Tensor]] = {}
        self._thread = threading.Thread(target=self._run, name="fastmerge-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i, group in enumerate(self.groups):
                size = sum(info.nbytes for _, info in group)
                with self._cv:
                    while not self._stop and self._inflight > 0 and self._inflight + size > self.budget:
                        self._cv.wait()
                    if self._stop:
                        return
                    self._inflight += size
                tensors = []
                for reader, info in group:
                    t = reader.get(info)
                    reader.populate(info, t)
                    tensors.append(t)
                self._q.put((i, tensors))
        except BaseException as e:  # surfaced in the consumer thread
            self._q.put(e)

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        for _ in range(len(self.groups)):
            item = self._q.get()
            if isinstance(item, BaseException):
                raise item
            self._loaded[item[0]] = item[1]
            yield item

    def release(self, i: int) -> None:
        tensors = self._loaded.pop(i)
        for (reader, info), t in zip(self.groups[i], tensors):
            reader.drop(info, t)
        size = sum(info.nbytes for _, info in self.groups[i])
        del tensors
        with self._cv:
            self._inflight -= size
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
