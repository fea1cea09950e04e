"""Exact selection: the k-th largest |x_t − base| per segment and model, by radix select, no sort.

A non-negative fp32 value orders like its bit pattern read as an unsigned integer (NaN above +inf,
as in torch's sort), and |δ| has the sign bit clear: 31 key bits. Three histogram passes resolve
them 11 + 11 + 9 bits at a time (bits 30–20, 19–9, 8–0), most significant first:

    pass j: every element whose key matches the prefix found so far adds 1 to bin (key >> shift_j) & mask
    scan j: the bin b holding the k-th largest: the highest b with count(bins ≥ b) ≥ k;
            k −= count(bins > b); prefix |= b << shift_j

After the third scan the prefix IS the bit pattern of the k-th largest value (what
``torch.kthvalue(|δ|, n − k + 1)`` returns, exactly), k is the number of entries equal to it that
an exact top-k keeps, and ``eq`` how many entries equal it.

Passes read base and every model once (δ is formed in registers, never stored) and fold all T
models and all Q queries per model (TIES: 1, the k-th largest; breadcrumbs: 2, the band's bounds)
into one launch; many small tensors share a launch through the packed layout (``_common``). The
histogram of a tile lives in registers/shared memory (``tl.histogram``: 2048 bins = 8 KB) and is
added to the global one [Q, 2048] (int64) only at its non-zero bins: |δ| of a real fine-tune spans
a few octaves, ~50–100 of the 2048 first-pass bins, and after the first pass only the ~1–5 % of
entries sharing the prefix count at all. 3 passes + 3 tiny scans, against torch.kthvalue's
materialised |δ| (4 bytes written + read per element per model) and its own multi-pass select.

Chunked tensors (``fastmerge.gpu_runner``: larger than the GPU budget) call ``Selection.histogram``
once per chunk and pass, and ``scan`` once per pass: the selection runs over the chunks first.

ONE READ. A selection started with the tensors' element counts (``Selection.start(k, device, numel=...)``,
as the TIES and breadcrumbs kernels do) whose pass-0 launch holds every whole tensor (a batch, not a row
chunk) selects everything in that launch with ``select_bracket`` (sample → bracket → one counting pass
reading base once per tile → exact select among the candidates): one read of the data instead of three,
same results (value, ``k``, ``eq``, ``nan``), no host round trip. Its misses (a bracket the sample got
wrong, overflowing candidates) run the radix passes above for those queries only (``need`` gates each
model's reads), so the answer is exact whatever the sample; passes 1 and 2 and the scans then do nothing.
Started with ``tiles_out`` (exact-k TIES), the count pass also records where each tile's candidates
went, and ``tile_ties`` counts each merge tile's entries equal to the selected value from them: the
tie ranks of the exact-k cut without another read of the data.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import select_bracket as sb
from ._common import HostPack, Segments, Tiles, interpreting, make_tiles, seg_tables, table

#: (shift, bits) of the three passes over the 31-bit key
PASSES: tuple[tuple[int, int], ...] = ((20, 11), (9, 11), (0, 9))
#: four passes of 8 bits (256 bins): one more read of the data, an 8x smaller tl.histogram per tile. On an
#: H100 (bench/RESULTS.md, 2026-11-24) the 2048-bin passes ran at 56-79 GB/s, 2 % of copy, where the CUDA
#: C++ kernel's shared-memory histograms reach ~30 %: whether fewer bins pay for the extra read is what
#: bench_kernels' "select8" case measures next to "select" (FASTMERGE_SELECT_BITS=8 makes it the default).
PASSES_8: tuple[tuple[int, int], ...] = ((23, 8), (15, 8), (7, 8), (0, 7))
SCHEDULES = {"11": PASSES, "8": PASSES_8}


def default_passes() -> tuple[tuple[int, int], ...]:
    """The pass schedule of new selections: ``FASTMERGE_SELECT_BITS`` (11, the default, or 8)."""
    import os

    bits = os.environ.get("FASTMERGE_SELECT_BITS", "11")
    if bits not in SCHEDULES:
        raise ValueError(f"FASTMERGE_SELECT_BITS must be one of {sorted(SCHEDULES)}, got {bits!r}")
    return SCHEDULES[bits]
#: a histogram program covers one tile of GPU_BLOCK elements: base is loaded once and kept in registers for
#: all T models, and each model's tile histogram is added to the global one with one atomic per non-zero bin.
#: 4096 elements at 8 warps compile to <= 128 registers for sm_90 with no spills (T = 2, 8; QPM 2 at T = 4:
#: tests/kernels/test_select_offline.py); 8192 took 179-197 (one CTA per SM). That is twice the atomics per
#: element of the former 4 sub-blocks of 2048 per program, whose loop re-read base once per model: which costs
#: more on an H100 is what bench/gpu_select.py's ``radix`` case measures (not yet run on a GPU)
GPU_BLOCK, GPU_WARPS = 4096, 8


@triton.jit
def _hist_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, hist_ptr, prefix_ptr, nan_ptr, group_ptr,
    tile_seg_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr, need_ptr,
    T: tl.constexpr, QPM: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One radix pass over one tile: base loaded once, then every model that needs the pass (unrolled over
    the T constexpr models: one load of each row per tile, checked offline for sm_90)."""
    NB: tl.constexpr = 1 << BITS
    p = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + p)
    start = tl.load(tile_start_ptr + p)
    seg_start = tl.load(seg_start_ptr + seg)  # an aligned tile may start before its segment
    end = tl.load(seg_end_ptr + seg)
    g = tl.load(group_ptr + seg)  # the query group (the whole tensor) this segment belongs to
    bins = tl.arange(0, NB)
    # any model of this tensor asking? (after the bracket, most ask nothing: then the tile reads no data)
    anyn = tl.load(need_ptr + g * T).to(tl.int32)
    for t in tl.static_range(1, T):
        anyn = anyn | tl.load(need_ptr + g * T + t).to(tl.int32)
    if anyn != 0:
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = (offs >= seg_start) & (offs < end)
        b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)  # once per tile, for all T models
        for t in tl.static_range(T):
            if tl.load(need_ptr + g * T + t) != 0:
                q0 = (g * T + t) * QPM
                x = tl.load(x_ptr + t * sx_t + offs, mask=valid, other=0.0).to(tl.float32)
                key = tl.abs(x - b).to(tl.int32, bitcast=True)  # sign bit clear: >= 0 as int32
                digit = (key >> SHIFT) & (NB - 1)
                if FIRST:
                    m0 = valid
                    n_nan = tl.sum((valid & (key > 0x7F800000)).to(tl.int64), 0)  # NaN: above +inf
                    tl.atomic_add(nan_ptr + g * T + t, n_nan, mask=n_nan > 0)
                else:
                    pre0 = (tl.load(prefix_ptr + q0) >> (SHIFT + BITS)).to(tl.int32)
                    m0 = valid & ((key >> (SHIFT + BITS)) == pre0)
                h0 = tl.histogram(digit, NB, mask=m0)
                tl.atomic_add(hist_ptr + q0 * NB + bins, h0.to(tl.int64), mask=h0 > 0)
                if QPM == 2:
                    if FIRST:
                        m1 = valid
                    else:
                        pre1 = (tl.load(prefix_ptr + q0 + 1) >> (SHIFT + BITS)).to(tl.int32)
                        m1 = valid & ((key >> (SHIFT + BITS)) == pre1)
                    h1 = tl.histogram(digit, NB, mask=m1)
                    tl.atomic_add(hist_ptr + (q0 + 1) * NB + bins, h1.to(tl.int64), mask=h1 > 0)


@triton.jit
def _scan_kernel(hist_ptr, k_ptr, prefix_ptr, eq_ptr, Q, SHIFT: tl.constexpr, BITS: tl.constexpr, QB: tl.constexpr):
    """QB queries per program: find the bin of the k-th largest, update k and the prefix, clear the bins."""
    NB: tl.constexpr = 1 << BITS
    q = tl.program_id(0).to(tl.int64) * QB + tl.arange(0, QB).to(tl.int64)
    qm = q < Q
    bins = tl.arange(0, NB)
    ptrs = hist_ptr + q[:, None] * NB + bins[None, :]
    h = tl.load(ptrs, mask=qm[:, None], other=0)
    k = tl.load(k_ptr + q, mask=qm, other=1)
    ge = tl.sum(h, 1)[:, None] - tl.cumsum(h, 1) + h  # entries in bins >= b
    b = tl.max(tl.where(ge >= k[:, None], bins[None, :], 0), 1)
    above = tl.sum(tl.where(bins[None, :] > b[:, None], h, 0), 1)
    eq = tl.sum(tl.where(bins[None, :] == b[:, None], h, 0), 1)
    tl.store(k_ptr + q, k - above, mask=qm)
    tl.store(prefix_ptr + q, tl.load(prefix_ptr + q, mask=qm, other=0) | (b.to(tl.int64) << SHIFT), mask=qm)
    tl.store(eq_ptr + q, eq, mask=qm)
    tl.store(ptrs, tl.zeros([QB, NB], dtype=tl.int64), mask=qm[:, None])


def hist_block(block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) of the histogram passes."""
    if block is not None:
        return block, 4
    return (8192, 1) if interpreting() else (GPU_BLOCK, GPU_WARPS)


@dataclasses.dataclass
class Selection:
    """The state of the k-th-largest searches of G tensors × T models × Q queries per model.

    ``k`` [G, T, Q] (int64, 1-based: k = 1 is the maximum). Queries with k < 1 are inactive (their
    results are meaningless; callers do not use them)."""

    k: torch.Tensor  # [G, T, Q] remaining rank, updated by each scan
    prefix: torch.Tensor  # [G, T, Q] resolved bits
    eq: torch.Tensor  # [G, T, Q] entries in the last chosen bin (after the last pass: equal to the value)
    nan: torch.Tensor  # [G, T] NaN |δ| (counted by the first pass): above every number in the selection's
    # order, but `NaN > th` is false, so exact-k's room for entries equal to th is k + nan (methods.ties)
    hist: torch.Tensor  # [G*T*Q, 2^max bits]
    schedule: tuple[tuple[int, int], ...] = PASSES  # (shift, bits) per pass, most significant first
    need: torch.Tensor | None = None  # int8 [G, T]: models the radix passes read (1 each unless bracketed)
    plan: sb.Plan | None = None  # the sampled bracket's sizes (``numel`` given): one-read selection
    config: sb.BracketConfig = sb.DEFAULT
    bracketed: bool = False  # the launch of pass 0 held every whole tensor: the bracket selected all
    fallbacks: torch.Tensor | None = None  # int8 [G, T, Q]: queries the bracket missed (radix select answered)
    result: sb.Result | None = None
    numel: tuple[int, ...] | None = None  # [G] element counts of the groups' whole tensors
    tables: torch.Tensor | None = None  # the bracket's device tables (``select_bracket.Plan.host_table``)
    tiles_out: bool = False  # exact-k asks where each tile's candidates went (``tile_ties``)
    launch: sb.Launch | None = None  # the bracket's launch: its candidates, until the merge has counted its ties

    @classmethod
    def start(
        cls, k: torch.Tensor, device, passes: Sequence[tuple[int, int]] | None = None,
        numel: Sequence[int] | None = None, config: sb.BracketConfig | None = None, tiles_out: bool = False,
    ) -> "Selection":
        """``k`` [G, T, Q] (on the host: the bracket's sample ranks are computed from it); ``numel``: each
        group's element count, which enables the one-read bracket selection for a launch that holds every
        whole tensor (``select_bracket``); without it, or for row chunks, the radix passes run. ``tiles_out``:
        the bracket keeps each tile's candidates for ``tile_ties`` (exact-k's tie ranks without a read)."""
        schedule = tuple(passes) if passes is not None else default_passes()
        if k.dim() != 3 or k.shape[2] not in (1, 2):
            raise ValueError(f"select: k must be [G, T, Q] with 1 or 2 queries per model, got {list(k.shape)}")
        if numel is not None and len(numel) != k.shape[0]:
            raise ValueError(f"select: {k.shape[0]} groups in k but {len(numel)} element counts")
        cfg = config or sb.DEFAULT
        if k.device.type != "cpu":  # a caller's device k (the kernel plans pass host k): read back once, here
            k = k.cpu()
        k = k.to(torch.int64).contiguous()
        pl = sb.plan(k, numel, cfg) if numel is not None else None
        # k and the bracket's tables: one asynchronous copy (k is copied, so the scans may update it)
        pack = HostPack(device)
        ik = pack.add(k)
        it = pack.add(pl.host_table(k.shape[1], k.shape[2])) if pl is not None else None
        views = pack.upload()
        k = views[ik]
        nb = 1 << max(b for _, b in schedule)
        q = k.numel()
        return cls(
            k=k, prefix=torch.zeros_like(k), eq=torch.zeros_like(k), nan=torch.zeros(k.shape[:2], dtype=torch.int64, device=device),
            hist=torch.zeros((max(q, 1), nb), dtype=torch.int64, device=device), schedule=schedule,
            need=torch.ones(k.shape[:2], dtype=torch.int8, device=device), plan=pl, config=cfg,
            numel=None if numel is None else tuple(int(n) for n in numel), tables=None if it is None else views[it],
            tiles_out=tiles_out,
        )

    @property
    def queries_per_model(self) -> int:
        return self.k.shape[2]

    def histogram(
        self, pass_no: int, x: torch.Tensor, base: torch.Tensor, segs: Segments,
        groups: Sequence[int] | torch.Tensor | None = None,
        tiles: Tiles | None = None, block: int | None = None,
    ) -> None:
        """Add the entries of ``segs`` (rows of ``x`` [T, N], ``base`` [N]) to pass ``pass_no``'s
        histograms; segment s belongs to tensor ``groups[s]`` (default: s). With element counts
        (``start(numel=...)``), pass 0 over a launch holding every whole tensor selects everything in one
        read (the later passes and scans do nothing)."""
        BLOCK, _ = hist_block(block)
        if tiles is None or tiles.block != BLOCK:
            tiles = make_tiles(segs, BLOCK, x.device)
        if tiles.count == 0:
            return
        T = x.shape[0]
        if T != self.k.shape[1]:
            raise ValueError(f"select: x has {T} models, the selection {self.k.shape[1]}")
        if x.dim() != 2 or x.stride(1) != 1 or base.dim() != 1 or not base.is_contiguous():
            raise ValueError("select: x must be [T, N] with contiguous rows and base a contiguous [N]")
        if segs.total > min(x.shape[1], base.numel()):
            raise ValueError(f"select: segments reach element {segs.total}, the rows/base hold {min(x.shape[1], base.numel())}")
        if isinstance(groups, torch.Tensor):
            g = groups if groups.device == x.device and groups.dtype == torch.int64 else groups.to(device=x.device, dtype=torch.int64)
        elif groups is None:
            g = torch.arange(segs.count, dtype=torch.int64, device=x.device)  # made on the device: no copy
        else:
            g = table(list(groups), torch.int64, x.device)  # one asynchronous copy
        if g.numel() != segs.count:
            raise ValueError(f"select: {segs.count} segments but {g.numel()} group indices")
        if self.bracketed:
            return  # pass 0 selected everything
        if pass_no == 0 and self._whole(segs):
            self._bracket(x, base, segs, g, block)
            return
        self._radix_pass(pass_no, x, base, segs, g, tiles, block, self.nan)

    def _whole(self, segs: Segments) -> bool:
        """Does this launch hold every group's whole tensor once (the batch path, not a row chunk)?"""
        return (
            self.plan is not None and segs.count == len(self.numel) and all(i == 0 for i in segs.idx0)
            and sorted(segs.numel) == sorted(self.numel)
        )

    def _radix_pass(self, pass_no, x, base, segs, g, tiles, block, nan, sizes=None) -> None:
        """One histogram pass over ``tiles`` (BLOCK elements each; ``sizes``: (BLOCK, warps))."""
        shift, bits = self.schedule[pass_no]
        BLOCK, warps = hist_block(block) if sizes is None else sizes
        start, end, _ = seg_tables(segs, x.device)
        _hist_kernel[(tiles.count,)](
            x, x.stride(0), base, self._bins(bits), self.prefix, nan, g,
            tiles.seg, tiles.start, start, end, self.need,
            T=x.shape[0], QPM=self.queries_per_model, SHIFT=shift, BITS=bits, FIRST=pass_no == 0, BLOCK=BLOCK,
            num_warps=warps,
        )

    def _bracket(self, x, base, segs, g, block) -> None:
        """The one-read selection (``select_bracket``), then the radix passes for the queries it missed:
        launched unconditionally (no host round trip), they read only models with a missed query."""
        QPM = self.queries_per_model
        r, launch = sb.select(x, base, segs, g, self.k.view(-1), self.plan, self.tables, QPM, block=block, cfg=self.config,
                              tiles_out=self.tiles_out)
        if self.tiles_out:
            launch.samp = launch.hist = None  # kept until the merge: only what ``tile_ties`` reads
            self.launch = launch
        shape = self.k.shape
        fail = r.fail.view(shape).bool()
        self.fallbacks = r.fail.view(shape)
        self.need = fail.any(dim=2).to(torch.int8).contiguous()
        self.k = torch.where(fail, self.k, torch.zeros_like(self.k)).contiguous()  # k < 1: inactive query
        scratch_nan = torch.zeros_like(self.nan)  # the count pass counted NaN exactly already
        # the count pass's (and the merge's) aligned tiles: already on the device, no table to copy
        tiles = make_tiles(segs, sb.count_block(x.shape[0], block)[0], x.device, aligned=True)
        for j in range(len(self.schedule)):
            if tiles.count:
                self._radix_pass(j, x, base, segs, g, tiles, block, scratch_nan, sb.count_block(x.shape[0], block))
            self._scan(j)
        self.prefix = torch.where(fail, self.prefix, r.value.view(shape)).contiguous()
        self.k = torch.where(fail, self.k, r.krem.view(shape)).contiguous()
        self.eq = torch.where(fail, self.eq, r.eq.view(shape)).contiguous()
        self.nan = r.nan.view(shape[:2]).contiguous()
        self.result = r
        self.bracketed = True

    def _bins(self, bits: int) -> torch.Tensor:
        """The [Q, 2^bits] histogram of a pass, a contiguous view of the same (zeroed) storage."""
        return self.hist.view(-1)[: self.hist.shape[0] << bits].view(self.hist.shape[0], 1 << bits)

    def scan(self, pass_no: int) -> None:
        if not self.bracketed:
            self._scan(pass_no)

    def _scan(self, pass_no: int) -> None:
        shift, bits = self.schedule[pass_no]
        q = self.k.numel()
        if q == 0:
            return
        # GPU: one query per program (2048 int64 bins = 16 per thread at 4 warps); the interpreter runs
        # programs one by one in Python, so it takes 64 queries at a time
        qb = 64 if interpreting() else 1
        _scan_kernel[(triton.cdiv(q, qb),)](
            self._bins(bits), self.k, self.prefix, self.eq, q, SHIFT=shift, BITS=bits, QB=qb, num_warps=4,
        )

    def tile_ties(self, x: torch.Tensor, base: torch.Tensor, segs: Segments, tiles: Tiles) -> torch.Tensor | None:
        """int64 [P, T·Q]: per tile of ``tiles`` and query, the entries equal to the selected value, counted
        from the bracket's candidates (no read of the data but for queries the bracket missed), or None
        where the bracket did not select this launch (row chunks) or ``tiles`` are not its count pass's."""
        ln = self.launch
        if ln is None or ln.segs != segs or ln.tiles is not tiles:
            return None
        return ln.tile_ties(x, base, self.values.reshape(-1))

    def release(self) -> None:
        """Drop the bracket's scratch (the merge has what it needs)."""
        self.launch = None

    @property
    def values(self) -> torch.Tensor:
        """fp32 [G, T, Q]: the k-th largest magnitudes (valid after the last scan)."""
        return self.prefix.to(torch.int32).view(torch.float32)


def kth_largest(
    x: torch.Tensor, base: torch.Tensor, segs: Segments, k: torch.Tensor, block: int | None = None,
    passes: Sequence[tuple[int, int]] | None = None, config: sb.BracketConfig | None = None,
) -> Selection:
    """The k-th largest |x_t − base| of every segment and model: ``k`` [S, T, Q] int64 → a finished
    ``Selection`` (``.values`` fp32 [S, T, Q], ``.k``: entries equal to it within the top k, ``.eq``:
    entries equal to it). ``passes``: the (shift, bits) schedule (default: ``default_passes()``)."""
    if k.dim() != 3 or k.shape[0] != segs.count or k.shape[1] != x.shape[0]:
        raise ValueError(f"select: k must be [S, T, Q] = [{segs.count}, {x.shape[0]}, Q], got {list(k.shape)}")
    # an explicit radix schedule runs the radix passes; by default the one-read bracket (whole segments)
    numel = segs.numel if passes is None and all(i == 0 for i in segs.idx0) else None
    sel = Selection.start(k, x.device, passes, numel=numel, config=config)
    BLOCK, _ = hist_block(block)
    tiles = make_tiles(segs, BLOCK, x.device)
    for j in range(len(sel.schedule)):
        sel.histogram(j, x, base, segs, tiles=tiles, block=block)
        sel.scan(j)
    return sel
