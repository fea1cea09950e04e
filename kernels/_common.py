"""Shared pieces of the merge kernels: the packed layout, block sizes, and exact rounding on store.

THE PACKED LAYOUT. Every merge kernel sees one batch of S output tensors ("segments") at once:

    x     [T, N]   row t = model t's tensors, concatenated (any float dtype; one dtype per batch)
    base  [N]      the base model's tensors, same order (absent for base-less methods)
    out   [N]      the merged tensors, output dtype
    segment s = elements [start_s, start_s + numel_s) of every row

so one launch merges a whole layer's norms and biases (thousands of 4096-element tensors in a 70B
model: one launch each would cost ~5 µs of launch latency against ~0.1 µs of memory time). A program
handles one TILE of BLOCK elements inside one segment; the tile table (``Tiles``) lists (segment,
first element) per program, built once per batch on the host. Offsets are int64 everywhere: a
128256x4096 embedding row-stacked 9 times is 4.7G elements, past int32.

``idx0`` (per segment) is the index, in the whole output tensor, of the segment's first element: a
row-chunked tensor (``fastmerge.gpu_runner``) is several segments with idx0 = the chunk's first
element, so the counter-based random masks (``_rng``) are the same as for the whole tensor.

ROUNDING. fp32 math, one rounding on store. bf16 is rounded here by hand, round-to-nearest-even on
the fp32 bit pattern (``_to_bf16_bits``): the Triton interpreter's fp32→bf16 cast truncates (49.6% of
random values differ from RNE, architecture.md §6), and the manual rounding costs 5 integer ops per
element on the GPU, hidden under memory time; the same code is then bit-exact on both. fp16: the
cast (RNE on the GPU and in numpy).

No module-level numpy arrays (they break the interpreter's patching), and nothing here queries the
CUDA driver in interpreter mode.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from . import interpreting

#: elements per program of the elementwise (fused) kernels on a GPU: 2048 bf16 = 8 per thread at 8
#: warps, i.e. one 16-byte load per thread and model (HOPPER.md: 16-byte accesses, coalesced).
GPU_BLOCK = 2048
GPU_WARPS = 8
#: under the interpreter every program is a numpy pass run one after another: few, large programs
#: (architecture.md §6: 1M elements took 0.65 s as 1024 programs, 0.07 s as 64).
INTERP_BLOCK = 8192

OUT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def numels(shapes: Sequence[Sequence[int]]) -> list[int]:
    """Element counts of ``shapes``."""
    return [math.prod(int(d) for d in s) for s in shapes]


def default_block(block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) of the elementwise kernels; ``block`` overrides (tests use small blocks so that
    a 300-element tensor spans several programs and every tile boundary is masked somewhere)."""
    if block is not None:
        return block, 4
    return (INTERP_BLOCK, 1) if interpreting() else (GPU_BLOCK, GPU_WARPS)


def out_arg(out: torch.Tensor) -> torch.Tensor:
    """The tensor handed to a kernel for ``out``: bf16 outputs are written as int16 bit patterns."""
    if out.dtype not in OUT_CODES:
        raise TypeError(f"output dtype {out.dtype} is not one of float32, bfloat16, float16")
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


@triton.jit
def _to_bf16_bits(x):
    """fp32 → bf16 bit pattern (int16), round to nearest even; NaN stays a (quiet) NaN, overflow → inf."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    res = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    return res.to(tl.int16)


@triton.jit
def store_rounded(ptr, x, mask, OUT: tl.constexpr):
    """Store fp32 ``x`` to ``ptr`` rounded once to the output dtype (OUT: 0 fp32, 1 bf16 bits, 2 fp16)."""
    if OUT == 1:
        tl.store(ptr, _to_bf16_bits(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_full(ptr, x, OUT: tl.constexpr):
    """``store_rounded`` of a full tile: no mask (vector stores where the pointer is aligned)."""
    if OUT == 1:
        tl.store(ptr, _to_bf16_bits(x), eviction_policy="evict_first")
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), eviction_policy="evict_first")


@dataclasses.dataclass(frozen=True)
class Segments:
    """S segments of a packed batch: ``start`` (offset in the packed rows), ``numel``, ``idx0`` (index
    of the first element in its whole tensor, for the random masks), ``shapes`` (each segment's shape:
    DELLA ranks within rows; a row chunk of a tensor has the chunk's shape)."""

    start: tuple[int, ...]
    numel: tuple[int, ...]
    idx0: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def packed(
        cls, numels: Sequence[int], idx0: Sequence[int] | None = None, shapes: Sequence[Sequence[int]] | None = None
    ) -> "Segments":
        """Segments laid end to end from offset 0 (``idx0`` defaults to 0 each: whole tensors)."""
        starts, s = [], 0
        for n in numels:
            starts.append(s)
            s += int(n)
        return cls(
            tuple(starts), tuple(int(n) for n in numels),
            tuple(int(i) for i in idx0) if idx0 is not None else (0,) * len(numels),
            None if shapes is None else tuple(tuple(int(d) for d in sh) for sh in shapes),
        )

    @property
    def count(self) -> int:
        return len(self.start)

    @property
    def total(self) -> int:
        return max((a + n for a, n in zip(self.start, self.numel)), default=0)

    def max_index(self) -> int:
        """The largest element index (idx0 + numel − 1) of any segment: > 2^32 − 1 switches the random
        generator to its 64-bit counter path."""
        return max((i + n - 1 for i, n in zip(self.idx0, self.numel)), default=0)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The program table: program p covers elements [start[p], start[p] + BLOCK) ∩ its segment.

    ``aligned``: the tiles are the BLOCK-aligned windows of the packed rows that meet each segment
    (start[p] a multiple of BLOCK; a segment's first and last windows are masked at the segment's
    edges, every window in between is a full tile): the merge kernels' layout, where a full tile is
    loaded without a mask in 16-byte vectors (its start is a multiple of BLOCK by construction, so
    ``tl.multiple_of`` is a fact, not a promise the caller must keep). Unaligned: tiles start at the
    segment's start (every tile but the last is full, none is known to be aligned)."""

    seg: torch.Tensor  # int32 [P]
    start: torch.Tensor  # int64 [P]
    first: torch.Tensor  # int64 [P]: index of the first tile of p's segment (for per-segment prefix sums)
    block: int
    aligned: bool = False
    seg_first: torch.Tensor | None = None  # int64 [S]: the first tile of each segment (per-segment sums)
    seg_ntiles: torch.Tensor | None = None  # int64 [S]: its number of tiles

    @property
    def count(self) -> int:
        return int(self.seg.numel())


class HostPack:
    """Small host tables bound for the device, packed into one buffer and copied with ONE asynchronous
    host-to-device copy (pinned memory, ``non_blocking=True``, on the current stream).

    Why: ``torch.tensor(..., device=cuda)`` and ``host.to(cuda)`` copy from pageable memory and then
    ``cudaStreamSynchronize`` (PyTorch's non_blocking=False path); a kernel plan built that way blocked
    the host 10-20 times per launch unit (gpu-design.md §5.2), so the engine could not pack the next
    unit while the GPU merged this one. Here nothing waits: the copy is queued before the kernels that
    read the tables on the same stream, and PyTorch's pinned-memory allocator keeps the host block
    until the copy has completed. Tables start at multiples of 64 bytes (any dtype's alignment, and
    whole 32-byte sectors for the kernels' loads)."""

    ALIGN = 64
    #: every ``upload`` (tests count them: one per launch unit)
    uploads = 0

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.items: list[tuple[torch.Tensor, int]] = []
        self.nbytes = 0

    def add(self, values, dtype: torch.dtype | None = None) -> int:
        """Queue a host table (a tensor, numpy array or nested list); returns its index in ``upload()``."""
        t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=dtype)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)  # a host cast (no device named)
        t = t.contiguous()
        if t.device.type != "cpu":
            raise ValueError("HostPack.add takes host tables")
        self.items.append((t, self.nbytes))
        self.nbytes += -(-max(t.numel() * t.element_size(), 1) // self.ALIGN) * self.ALIGN
        return len(self.items) - 1

    def upload(self) -> list[torch.Tensor]:
        """The tables on the device, in ``add`` order (views into one device buffer)."""
        if not self.items:
            return []
        cuda = self.device.type == "cuda"
        host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=cuda)
        for t, off in self.items:
            nb = t.numel() * t.element_size()
            host[off:off + nb].copy_(t.reshape(-1).view(torch.uint8) if nb else host[off:off])
        dev = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        dev.copy_(host, non_blocking=True)
        HostPack.uploads += 1
        out = []
        for t, off in self.items:
            nb = t.numel() * t.element_size()
            out.append(dev[off:off + nb].view(t.dtype).view(t.shape))
        return out


def _tile_arrays(segs: Segments, block: int, aligned: bool):
    import numpy as np  # local: no module-level numpy state in a kernel module (architecture.md §6)

    numel = np.asarray(segs.numel, dtype=np.int64)
    seg_start = np.asarray(segs.start, dtype=np.int64)
    if aligned:
        w0 = seg_start // block
        w1 = np.where(numel > 0, (seg_start + numel + block - 1) // block, w0)
        counts = w1 - w0
    else:
        w0 = np.zeros_like(seg_start)
        counts = (numel + block - 1) // block
    seg = np.repeat(np.arange(segs.count, dtype=np.int32), counts)
    first_of_seg = (np.cumsum(counts) - counts).astype(np.int64)
    first = first_of_seg[seg]
    within = np.arange(seg.size, dtype=np.int64) - first
    if aligned:
        start = (w0[seg] + within) * block
    else:
        start = seg_start[seg] + within * block
    return [np.ascontiguousarray(a) for a in (seg, start, first, first_of_seg, counts.astype(np.int64))]


#: device tables of recent launches (tiles per (segments, block, aligned); segment tables per segments),
#: filled by ``prepare_launch`` or on first use; 64 entries cover a unit's passes and merge
_CACHE: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
_CACHE_SIZE = 64


def _dev_key(device) -> str:
    """One cache key per device: "cuda" and "cuda:0" (the engine's device and its tensors') are the same."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def _cached(key: tuple):
    v = _CACHE.get(key)
    if v is not None:
        _CACHE.move_to_end(key)
    return v


def _store(key: tuple, v) -> None:
    _CACHE[key] = v
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)


def prepare_launch(pack: HostPack, segs: Segments, tiles: Sequence[tuple[int, bool]] = ()) -> Callable[[list], None]:
    """Add one launch's segment tables and tile tables (``(block, aligned)`` each) to ``pack``; returns
    the function that stores the uploaded tables in the cache (``make_tiles``, ``seg_tables`` then find
    them), to be called with ``pack.upload()``'s result."""
    dev = _dev_key(pack.device)
    todo: list[tuple[tuple, list[int], Callable]] = []
    if _cached(("seg", segs, dev)) is None:
        idx = [pack.add(list(segs.start), torch.int64), pack.add([a + n for a, n in zip(segs.start, segs.numel)], torch.int64),
               pack.add(list(segs.idx0), torch.int64)]
        todo.append((("seg", segs, dev), idx, tuple))
    for block, aligned in dict.fromkeys(tiles):
        key = ("tiles", segs, block, dev, aligned)
        if _cached(key) is None:
            idx = [pack.add(torch.from_numpy(a)) for a in _tile_arrays(segs, block, aligned)]
            todo.append((key, idx, lambda v, b=block, al=aligned: Tiles(v[0], v[1], v[2], b, al, v[3], v[4])))

    def done(views: list) -> None:
        for key, idx, make in todo:
            _store(key, make([views[i] for i in idx]))

    return done


def make_tiles(segs: Segments, block: int, device: torch.device | str, aligned: bool = False) -> Tiles:
    """Tiles of ``block`` elements covering every segment, segment after segment, in element order
    (cached: a tensor's passes and its merge reuse one table). ``aligned``: BLOCK-aligned windows
    (``Tiles``). Built with one asynchronous copy (``HostPack``) unless ``prepare_launch`` made it."""
    key = ("tiles", segs, block, _dev_key(device), aligned)
    t = _cached(key)
    if t is None:
        pack = HostPack(device)
        done = prepare_launch(pack, segs, [(block, aligned)])
        done(pack.upload())
        t = _cached(key)
    return t


def merge_block(T: int, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) of the merge passes (``gta``, ``linear``) for T input rows: on a GPU, tiles
    sized so that the T + 1 rows of a tile sit in registers without spilling (gpu-design.md §3b:
    8 bf16 per thread per row, 16-byte loads, up to T = 4; 4 per thread, 8-byte loads, up to 20; 2
    beyond), checked offline for sm_90 by ``tests/kernels/test_sm90_offline.py``."""
    if block is not None or interpreting():
        return default_block(block)
    if T <= 4:
        return 2048, 8
    if T <= 20:
        return 1024, 8
    return 512, 8


@functools.lru_cache(maxsize=8)
def _sm_count(device: str) -> int:
    return int(torch.cuda.get_device_properties(torch.device(device)).multi_processor_count)


def persistent_grid(n_tiles: int, device, per_sm: int = 4) -> int:
    """Programs of a persistent launch (each loops over tiles p, p + grid, ...): ``per_sm`` per SM on a
    GPU, one per tile under the interpreter (which runs programs one by one anyway)."""
    if interpreting() or torch.device(device).type != "cuda":
        return max(n_tiles, 1)
    return max(1, min(n_tiles, per_sm * _sm_count(str(torch.device(device)))))


def seg_tables(segs: Segments, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start, end, idx0) int64 [S] device tensors (cached and copied as the tiles)."""
    key = ("seg", segs, _dev_key(device))
    v = _cached(key)
    if v is None:
        pack = HostPack(device)
        prepare_launch(pack, segs)(pack.upload())
        v = _cached(key)
    return v


def table(rows: Sequence[Sequence[float]] | Sequence[float], dtype: torch.dtype, device) -> torch.Tensor:
    """A small host table (per segment, or per segment × model) as a contiguous device tensor (one
    asynchronous copy)."""
    pack = HostPack(device)
    pack.add(rows, dtype)
    return pack.upload()[0]
