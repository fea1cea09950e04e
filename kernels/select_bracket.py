"""Exact k-th largest |x_t − base| per tensor and model in ONE read of the data: sample → bracket → count.

Keys are the bit patterns of |fp32(x) − fp32(b)| read as int32 (sign bit clear: they order like the
values, NaN above +inf, as ``torch.kthvalue`` and ``csrc/cpu/select.cpp``). For each query (tensor g,
model t, rank k; breadcrumbs asks two ranks per model) four launches, all on the device, no value read
back by the host between them:

    K1 sample   m keys per (tensor, model): m/CH chunks of CH contiguous elements at stratified positions,
                the same for every model (the base chunk is read once for all T). m ≈ n/16 (≤ 1 M keys).
    K2 bracket  hi = the sample key of rank ⌊q·m − margin⌋, lo = that of rank ⌈q·m + margin⌉ (q = k/n,
                margin = Z·√(m·q(1−q)) + 4, Z = 6: a miss needs a 6σ sample, ~1e-9), by the rank select
                below on the sample. Tensors of ≤ ``direct`` elements skip the sample: [lo, hi] = every key.
    K3 count    the one full read: per tile, base loaded once, every model: above += #(key > hi); keys in
                [lo, hi] compacted into the query's candidate region (slots reserved by one atomic per tile
                and query, positions by a cumsum of the flags); NaN counted. A bracket with lo == hi is
                counted, never stored (> 50 % zero deltas: the bracket collapses on 0).
    K4 finish   r = k − above; if 1 ≤ r ≤ inside and the candidates fit: the r-th largest candidate IS the k-th
                largest (integer counts: exact), with the counts of keys above and equal to it.
    ties        (exact-k TIES only, ``tiles_out``) K3 also stores each tile's candidate count and first slot
                (its candidates lie there in index order); after the selection, per tile, the entries equal
                to the value: counted among those ≤ BLOCK candidates (a one-value bracket: all it counted;
                a missed query: on the tile's data). The merge's tie ranks are their prefix sums.

The rank select (K2 on the sample rows, K4 on the candidate regions) is a counting select on the value
range, many programs per selection: each round histograms the keys inside the current range [lo, hi] in
256 bins of width 2^shift (``tl.histogram`` per program, integer atomics into [selection, 256]), then one
small kernel picks the bin holding the r-th largest and narrows the range to it: 8 bits per round, 4
rounds for any 31-bit range (the CPU's ``rth_largest`` in csrc/cpu/select.cpp counts 11 bits per round
the same way). The rounds are a fixed launch sequence; a resolved selection's programs read nothing.

Correctness never depends on the sample, only speed does: a query whose bracket missed (r < 1 or
r > inside) or whose candidates overflowed their region sets a device flag, and the radix select of
``select.py`` (three histogram passes) runs for the flagged queries only; its launches are issued
unconditionally and every program of a model without a flagged query exits after one load.

Bytes: K3 reads base + T rows once ((T + 1)·e·n); K1 reads ≈ 1/16 of that (at most 1 M keys per model);
K2/K4 read the sample and the candidates (≈ 1–2 % of n per query at m = 1 M) from L2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import Segments, interpreting, make_tiles, merge_block, persistent_grid, seg_tables

#: the largest key: +NaN with every mantissa bit set (|δ| has the sign bit clear)
MAX_KEY = 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class BracketConfig:
    """Sizes of the sampled selection. Only speed depends on them (tests shrink them to reach every
    path on small tensors: the sample, a missed bracket, an overflowing candidate region)."""

    direct: int = 1 << 16  # tensors up to this many elements: no sample, every key is a candidate
    chunk: int = 128  # CH: contiguous elements per sample chunk (one 256-byte bf16 line per row)
    every: int = 2048  # one chunk per this many elements: m ≈ n/16
    max_chunks: int = 8192  # ≤ 1 M sample keys per model
    z: float = 6.0  # bracket half-width in binomial standard deviations of the sample rank
    headroom: float = 1.5  # candidate region = headroom × the expected candidates + slack
    slack: int = 4096


DEFAULT = BracketConfig()


@triton.jit
def _keys(ptr, ar, valid, b, FULL: tl.constexpr):
    """|x − b| bit patterns (int32) of one row of a tile: unmasked (vector loads) on a full tile."""
    if FULL:
        v = tl.load(ptr + ar, eviction_policy="evict_first")
    else:
        v = tl.load(ptr + ar, mask=valid, other=0.0)
    return tl.abs(v.to(tl.float32) - b).to(tl.int32, bitcast=True)


@triton.jit
def _sample_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, samp_ptr, group_ptr, seg_start_ptr,
    nchunk_ptr, stride_ptr, soff_ptr, m_ptr,
    T: tl.constexpr, CH: tl.constexpr, CPP: tl.constexpr,
):
    """K1: program (s, c) copies sample chunks c·CPP … c·CPP + CPP − 1 of segment s's tensor, all T models
    (base loaded once per chunk). Sample row of (g, t): samp[soff[g] + t·m[g] : + m[g]]."""
    s = tl.program_id(0)
    g = tl.load(group_ptr + s)
    nchunk = tl.load(nchunk_ptr + g)
    stride = tl.load(stride_ptr + g)
    soff = tl.load(soff_ptr + g)
    m = tl.load(m_ptr + g)
    start = tl.load(seg_start_ptr + s)
    ar = tl.arange(0, CH)
    for i in range(CPP):
        j = (tl.program_id(1) * CPP + i).to(tl.int64)
        if j < nchunk:
            # stratified: one chunk per stride, at a hashed offset inside it (deterministic: the same
            # positions every call, so the selection is a pure function of the data)
            h = (j * 2654435761 + 40503) & 0xFFFFFFFF
            # rounded down to 8 elements (16-byte vector loads): at most 7 elements before the segment, never
            # before the row, never past the chunk's end; the sample steers speed only, so a few of the
            # first chunk's keys may come from the previous segment
            pos = tl.multiple_of((start + j * stride + h % (stride - CH + 1)) // 8 * 8, 8)
            b = tl.load(base_ptr + pos + ar).to(tl.float32)
            for t in tl.static_range(T):
                key = tl.abs(tl.load(x_ptr + t * sx_t + pos + ar).to(tl.float32) - b).to(tl.int32, bitcast=True)
                tl.store(samp_ptr + tl.multiple_of(soff + t * m + j * CH, 16) + ar, key)  # m, soff: multiples of CH


#: the rank select's state per selection i, rows of an int64 [ST_ROWS, NSEL] table
ST_OFF, ST_LEN, ST_R, ST_LO, ST_HI, ST_ABOVE, ST_EQ, ST_SHIFT = range(8)
ST_ROWS = 8
# the same row numbers as compile-time constants (a compiled kernel reads only constexpr globals)
_ST_OFF, _ST_LEN, _ST_R, _ST_LO = tl.constexpr(ST_OFF), tl.constexpr(ST_LEN), tl.constexpr(ST_R), tl.constexpr(ST_LO)
_ST_HI, _ST_ABOVE, _ST_EQ, _ST_SHIFT = tl.constexpr(ST_HI), tl.constexpr(ST_ABOVE), tl.constexpr(ST_EQ), tl.constexpr(ST_SHIFT)
#: 8 bits of the value range per round: 4 rounds resolve any 31-bit range
RANK_ROUNDS = 4


@triton.jit
def _shift_of(span):
    """max(0, bit length of ``span`` − 8): the bin width (as a shift) that splits [lo, lo + span] into at
    most 256 bins."""
    v = span
    w = tl.zeros_like(span)
    big = v >= 65536
    v, w = tl.where(big, v >> 16, v), tl.where(big, w + 16, w)
    big = v >= 256
    v, w = tl.where(big, v >> 8, v), tl.where(big, w + 8, w)
    big = v >= 16
    v, w = tl.where(big, v >> 4, v), tl.where(big, w + 4, w)
    big = v >= 4
    v, w = tl.where(big, v >> 2, v), tl.where(big, w + 2, w)
    big = v >= 2
    v, w = tl.where(big, v >> 1, v), tl.where(big, w + 1, w)
    w = tl.where(v >= 1, w + 1, w)  # spans < 2^32
    return tl.maximum(w - 8, 0)


@triton.jit
def _rank_hist_kernel(keys_ptr, st_ptr, hist_ptr, NSEL, TILE: tl.constexpr, TPP: tl.constexpr):
    """One round of the rank select, program (i, c): the keys of selection i's region (tiles c·TPP …)
    inside its current range [lo, hi], histogrammed in 256 bins of width 2^shift (added to hist[i] at
    its non-zero bins). Resolved selections (lo == hi) and empty regions read nothing."""
    i = tl.program_id(0)
    length = tl.load(st_ptr + _ST_LEN * NSEL + i)
    lo = tl.load(st_ptr + _ST_LO * NSEL + i)
    hi = tl.load(st_ptr + _ST_HI * NSEL + i)
    if (lo < hi) & (length > 0):
        off = tl.load(st_ptr + _ST_OFF * NSEL + i)
        shift = tl.load(st_ptr + _ST_SHIFT * NSEL + i)
        h = tl.zeros([256], dtype=tl.int32)
        for u in range(TPP):
            o = (tl.program_id(1) * TPP + u).to(tl.int64) * TILE + tl.arange(0, TILE)
            m = o < length
            key = tl.load(keys_ptr + off + o, mask=m, other=0).to(tl.int64)
            inr = m & (key >= lo) & (key <= hi)
            d = tl.where(inr, (key - lo) >> shift, 0).to(tl.int32)
            h += tl.histogram(d, 256, mask=inr)
        bins = tl.arange(0, 256)
        tl.atomic_add(hist_ptr + i * 256 + bins, h.to(tl.int64), mask=h > 0)


@triton.jit
def _rank_step_kernel(st_ptr, hist_ptr, NSEL, SB: tl.constexpr):
    """The round's decision, SB selections per program: the bin b holding the r-th largest (the highest b
    with count(bins ≥ b) ≥ r); r −= count(bins > b), above += it; [lo, hi] narrows to bin b; when it is one
    value, eq = count(bin b) (every key of the region equal to it). Clears the histogram."""
    i = tl.program_id(0).to(tl.int64) * SB + tl.arange(0, SB)
    im = i < NSEL
    length = tl.load(st_ptr + _ST_LEN * NSEL + i, mask=im, other=0)
    r = tl.load(st_ptr + _ST_R * NSEL + i, mask=im, other=1)
    lo = tl.load(st_ptr + _ST_LO * NSEL + i, mask=im, other=0)
    hi = tl.load(st_ptr + _ST_HI * NSEL + i, mask=im, other=0)
    above = tl.load(st_ptr + _ST_ABOVE * NSEL + i, mask=im, other=0)
    eq = tl.load(st_ptr + _ST_EQ * NSEL + i, mask=im, other=0)
    shift = tl.load(st_ptr + _ST_SHIFT * NSEL + i, mask=im, other=0)
    live = im & (lo < hi) & (length > 0)
    bins = tl.arange(0, 256)
    ptrs = hist_ptr + i[:, None] * 256 + bins[None, :]
    h = tl.load(ptrs, mask=live[:, None], other=0)
    ge = tl.sum(h, 1)[:, None] - tl.cumsum(h, 1) + h
    b = tl.max(tl.where(ge >= r[:, None], bins[None, :], 0), 1).to(tl.int64)
    gt = tl.sum(tl.where(bins[None, :] > b[:, None], h, 0), 1)
    hb = tl.sum(tl.where(bins[None, :] == b[:, None], h, 0), 1)
    nlo = lo + (b << shift)
    nhi = tl.minimum(hi, nlo + (tl.full([SB], 1, tl.int64) << shift) - 1)
    done = nlo == nhi
    tl.store(st_ptr + _ST_R * NSEL + i, r - gt, mask=live)
    tl.store(st_ptr + _ST_ABOVE * NSEL + i, above + gt, mask=live)
    tl.store(st_ptr + _ST_LO * NSEL + i, nlo, mask=live)
    tl.store(st_ptr + _ST_HI * NSEL + i, nhi, mask=live)
    tl.store(st_ptr + _ST_EQ * NSEL + i, tl.where(done, hb, eq), mask=live)
    tl.store(st_ptr + _ST_SHIFT * NSEL + i, _shift_of(nhi - nlo), mask=live)
    tl.store(ptrs, tl.zeros([SB, 256], dtype=tl.int64), mask=live[:, None])


@triton.jit
def _bracket_kernel(st_ptr, NSEL, klo_ptr, khi_ptr):
    """K2's result, per query q: hi = selection 2q's value (the rh-th largest sample key), lo = selection
    2q + 1's (the rl-th); a selection without a region (no sample, rh < 1, rl > m) leaves MAX_KEY / 0."""
    q = tl.program_id(0)
    n_hi = tl.load(st_ptr + _ST_LEN * NSEL + 2 * q)
    n_lo = tl.load(st_ptr + _ST_LEN * NSEL + 2 * q + 1)
    hi = tl.where(n_hi > 0, tl.load(st_ptr + _ST_LO * NSEL + 2 * q), 0x7FFFFFFF)
    lo = tl.where(n_lo > 0, tl.load(st_ptr + _ST_LO * NSEL + 2 * q + 1), 0)
    tl.store(klo_ptr + q, lo.to(tl.int32))
    tl.store(khi_ptr + q, hi.to(tl.int32))


@triton.jit
def _count_tile(
    x_ptr, sx_t, base_ptr, start, seg_start, seg_end, g, p,
    need_ptr, klo_ptr, khi_ptr, above_ptr, fill_ptr, nan_ptr, cand_ptr, coff_ptr, cap_ptr, tslot_ptr, tin_ptr,
    T: tl.constexpr, QPM: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr, TILES: tl.constexpr,
):
    ar = tl.arange(0, BLOCK)
    if FULL:
        valid = ar < BLOCK
        b = tl.load(base_ptr + start + ar, eviction_policy="evict_first").to(tl.float32)
    else:
        offs = start + ar.to(tl.int64)
        valid = (offs >= seg_start) & (offs < seg_end)
        b = tl.load(base_ptr + start + ar, mask=valid, other=0.0).to(tl.float32)
    for t in tl.static_range(T):
        gt = g * T + t
        if tl.load(need_ptr + gt) != 0:
            key = _keys(x_ptr + t * sx_t + start, ar, valid, b, FULL)
            nn = tl.sum((valid & (key > 0x7F800000)).to(tl.int64), 0)
            tl.atomic_add(nan_ptr + gt, nn, mask=nn > 0)
            for qq in tl.static_range(QPM):
                q = gt * QPM + qq
                lo = tl.load(klo_ptr + q)
                hi = tl.load(khi_ptr + q)
                above = tl.sum((valid & (key > hi)).to(tl.int64), 0)
                tl.atomic_add(above_ptr + q, above, mask=above > 0)
                inside = valid & (key >= lo) & (key <= hi)
                n_in = tl.sum(inside.to(tl.int64), 0)
                if TILES:  # where each tile's candidates went (exact-k counts its ties from them: ``tile_ties``)
                    tl.store(tin_ptr + (p * T + t) * QPM + qq, n_in)
                if n_in > 0:
                    slot = tl.atomic_add(fill_ptr + q, n_in)  # this tile's first slot in the query's region
                    if TILES:
                        tl.store(tslot_ptr + (p * T + t) * QPM + qq, slot)
                    if lo != hi:  # a one-value bracket is counted, not stored
                        pos = slot + (tl.cumsum(inside.to(tl.int32), 0) - 1).to(tl.int64)
                        tl.store(cand_ptr + tl.load(coff_ptr + q) + pos, key, mask=inside & (pos < tl.load(cap_ptr + q)))
        elif TILES:
            for qq in tl.static_range(QPM):
                tl.store(tin_ptr + (p * T + t) * QPM + qq, 0)


@triton.jit
def _count_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, group_ptr, tile_seg_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr, n_tiles,
    need_ptr, klo_ptr, khi_ptr, above_ptr, fill_ptr, nan_ptr, cand_ptr, coff_ptr, cap_ptr, tslot_ptr, tin_ptr,
    T: tl.constexpr, QPM: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    """K3, persistent over an aligned tile table (``Tiles.aligned``): full tiles unmasked (16/8-byte
    vector loads), a segment's edge tiles masked. ``TILES``: also record, per tile and query, its candidates'
    count and first slot ([P, T, QPM]: 12 bytes per tile and query, < 1 % of the tile's bytes)."""
    for p in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        seg = tl.load(tile_seg_ptr + p)
        start = tl.multiple_of(tl.load(tile_start_ptr + p), BLOCK)  # a multiple of BLOCK by construction
        seg_start = tl.load(seg_start_ptr + seg)
        seg_end = tl.load(seg_end_ptr + seg)
        g = tl.load(group_ptr + seg)
        if (start >= seg_start) & (start + BLOCK <= seg_end):
            _count_tile(x_ptr, sx_t, base_ptr, start, seg_start, seg_end, g, p, need_ptr, klo_ptr, khi_ptr, above_ptr,
                        fill_ptr, nan_ptr, cand_ptr, coff_ptr, cap_ptr, tslot_ptr, tin_ptr, T, QPM, BLOCK, True, TILES)
        else:
            _count_tile(x_ptr, sx_t, base_ptr, start, seg_start, seg_end, g, p, need_ptr, klo_ptr, khi_ptr, above_ptr,
                        fill_ptr, nan_ptr, cand_ptr, coff_ptr, cap_ptr, tslot_ptr, tin_ptr, T, QPM, BLOCK, False, TILES)


@triton.jit
def _verify_kernel(k_ptr, klo_ptr, khi_ptr, above_ptr, fill_ptr, coff_ptr, cap_ptr, st_ptr, fail_ptr, Q):
    """K4a, per query: r = k − above; the bracket holds the k-th largest iff 1 ≤ r ≤ inside, and its
    candidates are all stored iff inside ≤ cap (a one-value bracket stores none and needs none). Sets up
    the rank select on the candidates (region = the query's slots) or flags the query for the radix select."""
    q = tl.program_id(0)
    k = tl.load(k_ptr + q)
    lo = tl.load(klo_ptr + q).to(tl.int64)
    hi = tl.load(khi_ptr + q).to(tl.int64)
    inside = tl.load(fill_ptr + q)
    r = k - tl.load(above_ptr + q)
    ok = (k >= 1) & (r >= 1) & (r <= inside) & ((lo == hi) | (inside <= tl.load(cap_ptr + q)))
    tl.store(st_ptr + _ST_OFF * Q + q, tl.load(coff_ptr + q))
    tl.store(st_ptr + _ST_LEN * Q + q, tl.where(ok & (lo < hi), inside, 0))
    tl.store(st_ptr + _ST_R * Q + q, r)
    tl.store(st_ptr + _ST_LO * Q + q, lo)
    tl.store(st_ptr + _ST_HI * Q + q, hi)
    tl.store(st_ptr + _ST_ABOVE * Q + q, tl.zeros_like(k))
    tl.store(st_ptr + _ST_EQ * Q + q, inside)  # a one-value bracket: every key inside equals it
    tl.store(st_ptr + _ST_SHIFT * Q + q, _shift_of(hi - lo))
    tl.store(fail_ptr + q, ((k >= 1) & (ok == 0)).to(tl.int8))


@triton.jit
def _finish_kernel(st_ptr, Q, val_ptr, krem_ptr, eq_ptr):
    """K4b, per query: the k-th largest (the selection's resolved value), the entries equal to it within
    the top k (the remaining rank), the entries equal to it."""
    q = tl.program_id(0)
    tl.store(val_ptr + q, tl.load(st_ptr + _ST_LO * Q + q))
    tl.store(krem_ptr + q, tl.load(st_ptr + _ST_R * Q + q))
    tl.store(eq_ptr + q, tl.load(st_ptr + _ST_EQ * Q + q))


@triton.jit
def _tile_ties_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, group_ptr, tile_seg_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr,
    k_ptr, fail_ptr, klo_ptr, khi_ptr, thr_ptr, tslot_ptr, tin_ptr, cand_ptr, coff_ptr, cnt_ptr,
    T: tl.constexpr, QPM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per tile p and query: the entries of the tile with |δ| equal to the query's selected value ``thr``
    (fp32), counted among the tile's candidates (K3 stored them contiguously, in index order, at
    ``tslot[p]``): at most BLOCK keys read back from L2 instead of the tile's T + 1 rows. A one-value
    bracket stored no candidates, but every key it counted equals the value; a query the bracket missed
    (the radix select answered it) counts on the tile's data, as ``gta.tie_counts`` does. Equality is the
    fp32 comparison of the merge's mask (a NaN value ties with nothing)."""
    p = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + p)
    g = tl.load(group_ptr + seg)
    start = tl.load(tile_start_ptr + p)
    ar = tl.arange(0, BLOCK)
    for t in tl.static_range(T):
        for qq in tl.static_range(QPM):
            q = (g * T + t) * QPM + qq
            j = (p * T + t) * QPM + qq
            thr = tl.load(thr_ptr + q)
            if tl.load(k_ptr + q) < 1:
                tl.store(cnt_ptr + j, tl.zeros([1], dtype=tl.int64).sum())  # inactive: no region, nothing to rank
            elif tl.load(fail_ptr + q) != 0:
                offs = start + ar.to(tl.int64)
                valid = (offs >= tl.load(seg_start_ptr + seg)) & (offs < tl.load(seg_end_ptr + seg))
                b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                mag = tl.abs(tl.load(x_ptr + t * sx_t + offs, mask=valid, other=0.0).to(tl.float32) - b)
                tl.store(cnt_ptr + j, tl.sum(((mag == thr) & valid).to(tl.int64), 0))
            elif tl.load(klo_ptr + q) == tl.load(khi_ptr + q):
                tl.store(cnt_ptr + j, tl.where(thr == thr, tl.load(tin_ptr + j), 0))
            else:
                n_in = tl.load(tin_ptr + j)
                m = ar < n_in
                slot = tl.where(n_in > 0, tl.load(tslot_ptr + j), 0)  # unwritten where the tile had none
                key = tl.load(cand_ptr + tl.load(coff_ptr + q) + slot + ar, mask=m, other=0)
                tl.store(cnt_ptr + j, tl.sum((m & (key.to(tl.float32, bitcast=True) == thr)).to(tl.int64), 0))


# --------------------------------------------------------------------------------------------------
# host side: the per-query plan (sizes and ranks only: every value is computed on the device)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Host-computed sizes of one selection: per group (tensor) the sample layout, per query the sample
    ranks of the bracket and the candidate region. Built from k and n alone (both known before any data
    is read), so the device needs no host round trip."""

    nchunk: list[int]  # [G] sample chunks (0: no sample)
    stride: list[int]  # [G] elements per chunk stride
    soff: list[int]  # [G] first sample key of the group's model-0 row
    m: list[int]  # [G] sample keys per model
    qrow: list[int]  # [Q] sample row offset of the query's model
    qm: list[int]  # [Q] sample keys of the row (0: no sample)
    rh: list[int]  # [Q] sample rank of hi (< 1: MAX_KEY)
    rl: list[int]  # [Q] sample rank of lo (> m: 0)
    coff: list[int]  # [Q] first slot of the candidate region
    cap: list[int]  # [Q] slots of the region
    need: list[int]  # [G·T] models with an active query
    sample_keys: int
    cand_slots: int

    def host_table(self, T: int, QPM: int) -> torch.Tensor:
        """Every table the device needs, as one int64 host tensor (``Launch`` takes its device copy): the
        group and query tables, then K2's initial rank-select state [ST_ROWS, 2Q] (selection 2q: rank rh of
        query q's sample row, giving hi; 2q + 1: rank rl, giving lo; no region where there is no sample or
        the rank falls outside it)."""
        Q = len(self.cap)
        k2 = [[0] * (2 * Q) for _ in range(ST_ROWS)]
        for q in range(Q):
            for j, rank in ((2 * q, self.rh[q]), (2 * q + 1, self.rl[q])):
                live = self.qm[q] > 0 and 1 <= rank <= self.qm[q]
                k2[ST_OFF][j], k2[ST_LEN][j], k2[ST_R][j] = self.qrow[q], self.qm[q] if live else 0, rank
                k2[ST_HI][j], k2[ST_SHIFT][j] = MAX_KEY, 31 - 8
        rows = [self.nchunk, self.stride, self.soff, self.m, self.coff, self.cap, self.need, *k2]
        return torch.tensor([v for r in rows for v in r], dtype=torch.int64)


def plan(k: torch.Tensor, numel: Sequence[int], cfg: BracketConfig = DEFAULT) -> Plan:
    """``k`` int64 [G, T, Q] on the host (k < 1: inactive), ``numel`` [G]."""
    if cfg.chunk % 16:
        raise ValueError(f"select: the sample chunk must be a multiple of 16 elements (aligned stores), got {cfg.chunk}")
    G, T, QPM = k.shape
    kk = k.numpy().tolist()  # a host tensor (numpy: no torch read-back call inside an engine unit)
    nchunk, stride, soff, ms = [], [], [], []
    qrow, qm, rh, rl, coff, cap, need = [], [], [], [], [], [], []
    s_tot = c_tot = 0
    for g in range(G):
        n = int(numel[g])
        active = [any(kk[g][t][q] >= 1 for q in range(QPM)) for t in range(T)]
        c = 0
        if n > cfg.direct and any(active):
            c = max(1, min(cfg.max_chunks, n // cfg.every))
            if n // c < cfg.chunk:
                c = n // cfg.chunk
        m = c * cfg.chunk
        nchunk.append(c)
        stride.append(n // c if c else 0)
        soff.append(s_tot)
        ms.append(m)
        s_tot += T * m
        for t in range(T):
            need.append(int(active[t]))
            for q in range(QPM):
                kq = int(kk[g][t][q])
                qrow.append(soff[g] + t * m)
                qm.append(m)
                if kq < 1:
                    rh.append(0), rl.append(0), cap.append(0), coff.append(c_tot)
                    continue
                if m == 0:
                    rh.append(0), rl.append(1)  # unused (m = 0): every key is a candidate
                    slots = n
                else:
                    f = kq / n
                    margin = max(0.0, cfg.z * math.sqrt(m * f * (1.0 - f)) + 4.0)
                    a, b = math.floor(f * m - margin), math.ceil(f * m + margin)
                    rh.append(a), rl.append(b)
                    frac = max(0, min(b, m) - max(a, 1) + 1) / m
                    slots = max(1, min(n, math.ceil(frac * n * cfg.headroom) + cfg.slack))
                coff.append(c_tot)
                cap.append(slots)
                c_tot += slots
    return Plan(nchunk, stride, soff, ms, qrow, qm, rh, rl, coff, cap, need, s_tot, c_tot)


def count_block(T: int, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) of K3: the merge pass's tile sizes (T + 1 rows of a tile in registers,
    16-byte loads up to T = 4, 8-byte beyond; checked offline for sm_90 by tests/kernels/test_select_offline.py)."""
    return merge_block(T, block)


#: the rank select's rounds: TILE keys per step (TPP steps per program, ``rank_tiles``); the decision kernel
#: takes SB selections per program ([SB, 256] int64 counts: SB = 2 compiles to < 128 registers at 4 warps)
RANK_TILE = 1024


def rank_sb() -> int:
    return 16 if interpreting() else 2


def rank_tiles() -> tuple[int, int]:
    """(TILE, TPP): 4 × 1024 keys per program on a GPU; under the interpreter one 4096-key step (its
    programs run one by one, and a masked step costs as much as a full one)."""
    return (4096, 1) if interpreting() else (RANK_TILE, 4)


def rank_select(buf: torch.Tensor, st: torch.Tensor, hist: torch.Tensor, max_len: int) -> None:
    """RANK_ROUNDS rounds of (histogram, decide) on the selections of ``st`` [ST_ROWS, NSEL]: each resolves
    8 more bits of the value range; a selection is finished (lo == hi) after at most 4. Launched as a
    fixed sequence (no host decision): resolved selections read nothing."""
    nsel = st.shape[1]
    if nsel == 0 or max_len <= 0:
        return
    tile, tpp = rank_tiles()
    for _ in range(RANK_ROUNDS):
        _rank_hist_kernel[(nsel, triton.cdiv(max_len, tile * tpp))](buf, st, hist, nsel, TILE=tile, TPP=tpp, num_warps=4)
        _rank_step_kernel[(triton.cdiv(nsel, rank_sb()),)](st, hist, nsel, SB=rank_sb(), num_warps=4)


@dataclasses.dataclass
class Result:
    """Per query (flattened [G·T·Q]): value bits (int64), entries equal to it within the top k, entries
    equal to it, and 1 where the bracket failed (the radix select answers those); NaN per [G·T]."""

    value: torch.Tensor
    krem: torch.Tensor
    eq: torch.Tensor
    fail: torch.Tensor
    nan: torch.Tensor
    lo: torch.Tensor | None = None  # the brackets (int32 keys) and their counts, for tests and benchmarks
    hi: torch.Tensor | None = None
    above: torch.Tensor | None = None
    inside: torch.Tensor | None = None


class Launch:
    """The scratch of one selection launch over the device tables (``run`` may repeat, e.g. to time the
    kernels alone). The host-computed tables arrive in one asynchronous copy (``Selection.start``'s
    ``HostPack``); nothing is ever copied back."""

    def __init__(self, x, base, segs: Segments, groups: torch.Tensor, k_dev: torch.Tensor, pl: Plan, tables: torch.Tensor,
                 QPM: int, block: int | None = None, cfg: BracketConfig = DEFAULT, tiles_out: bool = False) -> None:
        """``tables``: the device copy of ``pl.host_table(T, QPM)``. ``tiles_out``: K3 records where each
        tile's candidates went, for ``tile_ties`` (exact-k TIES)."""
        dev = x.device
        self.x, self.base, self.segs, self.groups, self.k, self.pl, self.QPM, self.cfg = x, base, segs, groups, k_dev, pl, QPM, cfg
        T = x.shape[0]
        G = len(pl.m)
        self.Q = Q = G * T * QPM
        tabs, o = [], 0
        for n in (G, G, G, G, Q, Q, G * T):
            tabs.append(tables[o:o + n])
            o += n
        self.nchunk, self.stride, self.soff, self.m, self.coff, self.cap, need = tabs
        self.need = need.to(torch.int8)
        self.st2_init = tables[o:o + ST_ROWS * 2 * Q].view(ST_ROWS, 2 * Q)
        self.st2 = torch.empty_like(self.st2_init)  # K2's state (rerun-safe: copied from the init each run)
        self.st4 = torch.empty((ST_ROWS, Q), dtype=torch.int64, device=dev)
        self.hist = torch.zeros((max(2 * Q, 1), 256), dtype=torch.int64, device=dev)  # cleared by every round
        self.max_m, self.max_cap = max(pl.m, default=0), max(pl.cap, default=0)
        self.start, self.end, _ = seg_tables(segs, dev)
        self.samp = torch.empty(max(pl.sample_keys, 1), dtype=torch.int32, device=dev)
        self.cand = torch.empty(max(pl.cand_slots, 1), dtype=torch.int32, device=dev)
        self.lo = torch.empty(Q, dtype=torch.int32, device=dev)
        self.hi = torch.empty(Q, dtype=torch.int32, device=dev)
        self.counts = torch.zeros(2 * Q + G * T, dtype=torch.int64, device=dev)  # above, inside, NaN: one memset
        self.above, self.fill, self.nan = self.counts[:Q], self.counts[Q:2 * Q], self.counts[2 * Q:]
        self.BLOCK, self.warps = count_block(T, block)
        self.tiles = make_tiles(segs, self.BLOCK, dev, aligned=True)
        self.out = torch.empty((3, Q), dtype=torch.int64, device=dev)
        self.fail = torch.empty(Q, dtype=torch.int8, device=dev)
        self.tiles_out = tiles_out
        P = self.tiles.count
        self.tslot = torch.empty((P, T, QPM) if tiles_out else (1,), dtype=torch.int64, device=dev)
        self.tin = torch.empty((P, T, QPM) if tiles_out else (1,), dtype=torch.int32, device=dev)  # <= BLOCK each

    def run(self) -> Result:
        x, base, pl, T = self.x, self.base, self.pl, self.x.shape[0]
        res = Result(self.out[0], self.out[1], self.out[2], self.fail, self.nan, self.lo, self.hi, self.above, self.fill)
        if self.Q == 0:
            return res
        self.counts.zero_()
        max_c = max(pl.nchunk, default=0)
        if max_c and self.segs.count:
            cpp = 64 if interpreting() else 1  # the interpreter runs programs one by one: few, long ones
            _sample_kernel[(self.segs.count, triton.cdiv(max_c, cpp))](
                x, x.stride(0), base, self.samp, self.groups, self.start, self.nchunk, self.stride, self.soff, self.m,
                T=T, CH=self.cfg.chunk, CPP=cpp, num_warps=1,
            )
        self.st2.copy_(self.st2_init)
        rank_select(self.samp, self.st2, self.hist, self.max_m)
        _bracket_kernel[(self.Q,)](self.st2, 2 * self.Q, self.lo, self.hi, num_warps=1)
        if self.tiles.count:
            _count_kernel[(persistent_grid(self.tiles.count, x.device, per_sm=2),)](
                x, x.stride(0), base, self.groups, self.tiles.seg, self.tiles.start, self.start, self.end, self.tiles.count,
                self.need, self.lo, self.hi, self.above, self.fill, self.nan, self.cand, self.coff, self.cap,
                self.tslot, self.tin, T=T, QPM=self.QPM, BLOCK=self.BLOCK, TILES=self.tiles_out, num_warps=self.warps,
            )
        _verify_kernel[(self.Q,)](self.k, self.lo, self.hi, self.above, self.fill, self.coff, self.cap, self.st4,
                                  res.fail, self.Q, num_warps=1)
        rank_select(self.cand, self.st4, self.hist, self.max_cap)
        _finish_kernel[(self.Q,)](self.st4, self.Q, res.value, res.krem, res.eq, num_warps=1)
        return res


    def tile_ties(self, x: torch.Tensor, base: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        """int64 [P, T·QPM]: per tile of ``self.tiles`` (the merge's aligned tiles) and query, the entries equal
        to ``thr`` [Q] (fp32, the selected values, radix answers included) from K3's candidates, so exact-k
        ranks its ties without another read of the data (``tiles_out`` launches only; run after ``run``)."""
        if not self.tiles_out:
            raise ValueError("select: tile_ties needs a launch made with tiles_out=True")
        T, P = x.shape[0], self.tiles.count
        cnt = torch.empty((P, T * self.QPM), dtype=torch.int64, device=x.device)
        if P:
            _tile_ties_kernel[(P,)](
                x, x.stride(0), base, self.groups, self.tiles.seg, self.tiles.start, self.start, self.end,
                self.k, self.fail, self.lo, self.hi, thr.contiguous(), self.tslot, self.tin, self.cand, self.coff, cnt,
                T=T, QPM=self.QPM, BLOCK=self.BLOCK, num_warps=self.warps,
            )
        return cnt


def select(
    x: torch.Tensor, base: torch.Tensor, segs: Segments, groups: torch.Tensor, k_dev: torch.Tensor, pl: Plan,
    tables: torch.Tensor, QPM: int, block: int | None = None, cfg: BracketConfig = DEFAULT, tiles_out: bool = False,
) -> tuple[Result, Launch]:
    """K1–K4 over one launch holding every group's whole tensor once (segment s = all of group
    ``groups[s]``'s elements). ``k_dev`` int64 [G·T·Q] and ``tables`` (``Plan.host_table``) on the device.
    Returns the result and the launch (its scratch, for ``Launch.tile_ties``)."""
    launch = Launch(x, base, segs, groups, k_dev, pl, tables, QPM, block, cfg, tiles_out)
    return launch.run(), launch
