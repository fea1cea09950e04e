"""The fused generalized-task-arithmetic pass: mask, rescale, weight, consensus, disjoint mean, λ, + base.

One kernel serves task_arithmetic, ties, dare_*, breadcrumbs* and della* (``fastmerge.methods.gta`` is
their shared torch tail; this is its fused form). Per element, for the T models of a packed batch
(``_common``):

    δ_t  = x_t − base                           (fp32; x and base upcast after the load)
    k_t  = keep mask (MASK): 0 all | 1 band lo ≤ |δ_t| ≤ hi (ties: lo = k-th largest, hi = +inf;
           breadcrumbs: the band's bounds), ``whole`` (an int8 flag) keeps all | 2 Bernoulli h < threshold (DARE) |
           3 u < p(rank) (DELLA); TOPK: |δ| > lo, or = lo and among the first ``room`` such in index order
    wδ_t = k_t ? w_t·(δ_t·s_t) : 0              (s_t: the L1 rescale ratio, 1 without; ``l1_norms``)
    CONSENSUS 0: num = Σ_t wδ_t  [/ div_s]
    CONSENSUS 1 (sum) / 2 (count): total = Σ_t wδ_t (or Σ sign wδ_t); m = total ≥ 0 ? 1 : −1;
           a_t = [sign wδ_t = m]; num = Σ a_t·wδ_t [/ Σ a_t·w_t, 0 → 1]
    out  = base + num·λ_s, rounded once to the output dtype

Every sum runs in model order with one rounding per operation, the division is IEEE (``div_rn``: a
plain ``/`` is the approximate ``div.full.f32`` on NVIDIA GPUs) and kernels are launched with
``enable_fp_fusion=False`` (no a·b + c contracted into an FMA), so the result equals the torch
reference bit for bit, not just within an ulp. One exception: the L1 rescale ratio ‖δ‖₁/‖k·δ‖₁. The
reference sums n fp32 terms in torch's order (its sums carry 1–2 ulps of rounding at n ≈ 500, more
for larger n); ``l1_norms`` sums per 2048-element tile in fp32, then in fp64: the two ratios differ by
a few fp32 ulps, and so may the rescaled outputs' last bits (measured: ≤ 5 ulps of the ratio on the
test shapes; bf16 outputs then differ by ≤ 1 ulp in < 1 % of elements). Given the same ratio the
fused pass is bit-exact (tests/kernels: ``check_rescale``).

Bytes: T + 1 input rows read once (the consensus's second loop re-reads the tile from L1/L2: 2048
elements × T rows ≤ 32 KB per program), one output row written: the floor is (T + 1)·in + out bytes.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import _rng
from ._common import (
    OUT_CODES, HostPack, Segments, Tiles, default_block, make_tiles, merge_block, out_arg, persistent_grid, prepare_launch,
    seg_tables, store_full, store_rounded,
)

MASK_ALL, MASK_BAND, MASK_BERNOULLI, MASK_DELLA = 0, 1, 2, 3
CONSENSUS = {None: 0, "sum": 1, "count": 2}


@triton.jit
def _keep(
    mag, ar, valid, idx, seg, t, T, p,
    lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
    rk_ptr, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
    MASK: tl.constexpr, TOPK: tl.constexpr, BIG: tl.constexpr, FULL: tl.constexpr,
):
    """The keep mask of model t on one tile (see the module docstring). ``rk_ptr``: model t's DELLA
    ranks at the tile's first element (loaded at ``ar``); ``whole_ptr``: int8 [S, T], 1 = the task
    vector is kept whole (density ≥ 1), an explicit flag: a NaN threshold is a real value (≥ k NaN
    deltas) and keeps nothing, as in the reference."""
    st = seg * T + t
    zero = tl.zeros_like(ar).to(tl.int32)  # scalar flags are ORed in as blocks (the interpreter needs it)
    if MASK == 0:
        keep = mag == mag
        keep = keep | (mag != mag)
    elif MASK == 1:
        lo = tl.load(lo_ptr + st)
        hi = tl.load(hi_ptr + st)
        if TOPK:
            # exact k: everything above the k-th largest, then the first `room` entries equal to it
            at = (mag == lo) & valid
            rank = tl.load(eqb_ptr + p * T + t) + tl.cumsum(at.to(tl.int64), 0) - 1
            keep = (mag > lo) | (at & (rank < tl.load(room_ptr + st)))
        else:
            keep = (mag >= lo) & (mag <= hi)
        keep = keep | ((zero + tl.load(whole_ptr + st).to(tl.int32)) != 0)
    else:
        h = _rng.hash_u32(
            idx, tl.load(k0_ptr + st).to(tl.uint32), tl.load(k1h_ptr + st).to(tl.uint32),
            tl.load(k1_ptr + st).to(tl.uint32), BIG,
        )
        if MASK == 2:
            thr = tl.load(pth_ptr + st)
            keep = (h < thr.to(tl.uint32)) | ((zero + (thr < 0).to(tl.int32)) != 0)  # thr < 0: fp32(density) >= 1, keep all
        else:
            if FULL:
                r = tl.load(rk_ptr + ar).to(tl.float32)
            else:
                r = tl.load(rk_ptr + ar, mask=valid, other=0).to(tl.float32)
            nm1 = tl.load(nm1_ptr + seg)
            rank_norm = tl.where(nm1 > 0, tl.div_rn(r, tl.maximum(nm1, 1.0)), 0.5)  # a 1-entry row: p = density
            plo = tl.load(plo_ptr + st)
            prob = plo + tl.load(pspan_ptr + st) * rank_norm
            u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)  # _rng.uniform, inlined
            keep = (u < prob) | ((zero + tl.load(whole_ptr + st).to(tl.int32)) != 0)
    return keep


@triton.jit
def _row(ptr, ar, valid, FULL: tl.constexpr):
    """One row of a tile as fp32: unmasked (16-byte vectors where aligned) on a full tile."""
    if FULL:
        v = tl.load(ptr + ar, eviction_policy="evict_first")
    else:
        v = tl.load(ptr + ar, mask=valid, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _weighted_delta(
    xt_ptr, b, w, scale_ptr, ar, valid, idx, seg, t, T, p,
    lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr, rk_ptr,
    plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
    MASK: tl.constexpr, RESCALE: tl.constexpr, TOPK: tl.constexpr, BIG: tl.constexpr, FULL: tl.constexpr,
):
    """w·δ' of model ``t`` on this tile (fp32): δ = x_t − base, kept by the method's mask (none when
    MASK == 0), L1-rescaled when RESCALE; pruned entries are 0. Shared by the sum and both election
    loops (T is a compile-time constant and both loops are unrolled, so the compiler computes it once:
    the second loop's loads and hashes are the first's, ``test_sm90_offline`` counts the loads)."""
    d = _row(xt_ptr, ar, valid, FULL) - b
    if MASK == 0:
        wd = w * d
    else:
        keep = _keep(tl.abs(d), ar, valid, idx, seg, t, T, p, lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr,
                     pth_ptr, rk_ptr, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr, MASK, TOPK, BIG, FULL)
        if RESCALE:
            d = d * tl.load(scale_ptr + seg * T + t)
        wd = tl.where(keep, w * d, 0.0)
    return wd


@triton.jit
def _gta_tile(
    x_ptr, sx_t, base_ptr, out_ptr, start, seg, seg_start, seg_end, idx0, p,
    w_ptr, scale_ptr, lam_ptr, div_ptr,
    lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
    rank_ptr, srank_t, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
    T: tl.constexpr, MASK: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, RESCALE: tl.constexpr,
    TOPK: tl.constexpr, BIG: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr,
):
    """One tile of the fused pass: scalar int64 row pointers at the tile's start, int32 in-tile offsets."""
    ar = tl.arange(0, BLOCK)
    if FULL:
        valid = ar < BLOCK
    else:
        offs = start + ar.to(tl.int64)
        valid = (offs >= seg_start) & (offs < seg_end)
    idx = idx0 + (start - seg_start) + ar.to(tl.int64)  # element index in the whole tensor (random masks)
    b = _row(base_ptr + start, ar, valid, FULL)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    if CONSENSUS == 0:
        for t in tl.static_range(T):
            w = tl.load(w_ptr + seg * T + t)
            wd = _weighted_delta(x_ptr + t * sx_t + start, b, w, scale_ptr, ar, valid, idx, seg, t, T, p,
                                 lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
                                 rank_ptr + t * srank_t + start, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
                                 MASK, RESCALE, TOPK, BIG, FULL)
            num = num + wd
        if NORMALIZE:
            num = tl.div_rn(num, tl.load(div_ptr + seg))
    else:
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for t in tl.static_range(T):
            w = tl.load(w_ptr + seg * T + t)
            wd = _weighted_delta(x_ptr + t * sx_t + start, b, w, scale_ptr, ar, valid, idx, seg, t, T, p,
                                 lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
                                 rank_ptr + t * srank_t + start, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
                                 MASK, RESCALE, TOPK, BIG, FULL)
            if CONSENSUS == 1:
                total = total + wd
            else:
                total = total + tl.where(wd > 0, 1.0, tl.where(wd < 0, -1.0, 0.0))  # sign; NaN → 0 as torch
        majority = tl.where(total >= 0, 1.0, -1.0)
        den = tl.zeros([BLOCK], dtype=tl.float32)
        # second loop: the same wδ_t again (unrolled: the compiler reuses the first loop's values)
        for t in tl.static_range(T):
            w = tl.load(w_ptr + seg * T + t)
            wd = _weighted_delta(x_ptr + t * sx_t + start, b, w, scale_ptr, ar, valid, idx, seg, t, T, p,
                                 lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
                                 rank_ptr + t * srank_t + start, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
                                 MASK, RESCALE, TOPK, BIG, FULL)
            agree = tl.where(wd > 0, 1.0, tl.where(wd < 0, -1.0, 0.0)) == majority  # pruned entries (0) never agree
            num = num + tl.where(agree, wd, 0.0)
            den = den + tl.where(agree, w, 0.0)
        if NORMALIZE:
            num = tl.div_rn(num, tl.where(den == 0, 1.0, den))
    res = b + num * tl.load(lam_ptr + seg)
    if FULL:
        store_full(out_ptr + start + ar, res, OUT)
    else:
        store_rounded(out_ptr + start + ar, res, valid, OUT)


@triton.jit
def _gta_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, out_ptr,
    tile_seg_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr, seg_idx0_ptr, n_tiles,
    w_ptr, scale_ptr, lam_ptr, div_ptr,
    lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
    rank_ptr, srank_t: tl.int64, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
    T: tl.constexpr,
    MASK: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, RESCALE: tl.constexpr,
    TOPK: tl.constexpr, BIG: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Persistent: program i merges tiles i, i + grid, ... of an aligned tile table (``Tiles.aligned``):
    a tile inside its segment takes the unmasked path, a segment's edge tiles the masked one."""
    for p in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        seg = tl.load(tile_seg_ptr + p)
        start = tl.multiple_of(tl.load(tile_start_ptr + p), BLOCK)  # a multiple of BLOCK by construction
        seg_start = tl.load(seg_start_ptr + seg)
        seg_end = tl.load(seg_end_ptr + seg)
        idx0 = tl.load(seg_idx0_ptr + seg)
        if (start >= seg_start) & (start + BLOCK <= seg_end):
            _gta_tile(x_ptr, sx_t, base_ptr, out_ptr, start, seg, seg_start, seg_end, idx0, p,
                      w_ptr, scale_ptr, lam_ptr, div_ptr, lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
                      rank_ptr, srank_t, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
                      T, MASK, CONSENSUS, NORMALIZE, RESCALE, TOPK, BIG, OUT, BLOCK, True)
        else:
            _gta_tile(x_ptr, sx_t, base_ptr, out_ptr, start, seg, seg_start, seg_end, idx0, p,
                      w_ptr, scale_ptr, lam_ptr, div_ptr, lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
                      rank_ptr, srank_t, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
                      T, MASK, CONSENSUS, NORMALIZE, RESCALE, TOPK, BIG, OUT, BLOCK, False)


@triton.jit
def _l1_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, part_ptr,
    tile_seg_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr, seg_idx0_ptr,
    lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr, pth_ptr,
    rank_ptr, srank_t: tl.int64, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
    T,
    MASK: tl.constexpr, TOPK: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per tile and model: (Σ|δ|, Σ|k·δ|) → part [P, T, 2] (fp32; reduced per segment in fp64 after)."""
    p = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + p)
    start = tl.load(tile_start_ptr + p)
    ar = tl.arange(0, BLOCK)
    offs = start + ar.to(tl.int64)
    seg_start = tl.load(seg_start_ptr + seg)
    valid = (offs >= seg_start) & (offs < tl.load(seg_end_ptr + seg))
    idx = tl.load(seg_idx0_ptr + seg) + (offs - seg_start)
    b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    for t in range(T):
        mag = tl.abs(tl.load(x_ptr + t * sx_t + offs, mask=valid, other=0.0).to(tl.float32) - b)
        keep = _keep(mag, ar, valid, idx, seg, t, T, p, lo_ptr, hi_ptr, whole_ptr, k0_ptr, k1h_ptr, k1_ptr,
                     pth_ptr, rank_ptr + t * srank_t + start, plo_ptr, pspan_ptr, nm1_ptr, eqb_ptr, room_ptr,
                     MASK, TOPK, BIG, False)
        tl.store(part_ptr + (p * T + t) * 2, tl.sum(tl.where(valid, mag, 0.0), 0))
        tl.store(part_ptr + (p * T + t) * 2 + 1, tl.sum(tl.where(valid & keep, mag, 0.0), 0))


@triton.jit
def _eqcount_kernel(
    x_ptr, sx_t: tl.int64, base_ptr, cnt_ptr, tile_seg_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr, thr_ptr, T,
    BLOCK: tl.constexpr,
):
    """Per tile and model: how many |δ| equal the k-th largest (exact-k TIES ranks them by index)."""
    p = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + p)
    offs = tl.load(tile_start_ptr + p) + tl.arange(0, BLOCK).to(tl.int64)
    valid = (offs >= tl.load(seg_start_ptr + seg)) & (offs < tl.load(seg_end_ptr + seg))
    b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    for t in range(T):
        mag = tl.abs(tl.load(x_ptr + t * sx_t + offs, mask=valid, other=0.0).to(tl.float32) - b)
        at = (mag == tl.load(thr_ptr + seg * T + t)) & valid
        tl.store(cnt_ptr + p * T + t, tl.sum(at.to(tl.int64), 0))


@triton.jit
def _segsum_kernel(part_ptr, first_ptr, ntiles_ptr, out_ptr, C, BLOCK: tl.constexpr):
    """out[s, c] = Σ over segment s's tiles of part[tile, c], in fp64, in a fixed order (no atomics:
    the rescale ratio, and so the merged model, must not change from run to run)."""
    s = tl.program_id(0)
    c = tl.program_id(1)
    first = tl.load(first_ptr + s)
    n = tl.load(ntiles_ptr + s)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, n, BLOCK):
        j = i + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(part_ptr + (first + j) * C + c, mask=j < n, other=0.0).to(tl.float64)
    tl.store(out_ptr + s * C + c, tl.sum(acc, 0))


# --------------------------------------------------------------------------------------------------
# host side


@dataclasses.dataclass
class MaskTables:
    """Per (segment, model) tables of one mask kind; unused ones stay None (a dummy is passed)."""

    kind: int = MASK_ALL
    lo: torch.Tensor | None = None  # fp32 [S, T]
    hi: torch.Tensor | None = None  # fp32 [S, T]
    whole: torch.Tensor | None = None  # int8 [S, T]: 1 = kept whole (density >= 1), MASK 1 and 3
    k0: torch.Tensor | None = None  # int64 [S, T] stream keys (MASK 2, 3)
    k1h: torch.Tensor | None = None
    k1: torch.Tensor | None = None
    pth: torch.Tensor | None = None  # int64 [S, T] integer Bernoulli thresholds, −1: keep all
    ranks: torch.Tensor | None = None  # int32 [T, N] DELLA ranks in their rows
    plo: torch.Tensor | None = None  # fp32 [S, T] DELLA lowest probability
    pspan: torch.Tensor | None = None  # fp32 [S, T] DELLA probability span 2ε
    nm1: torch.Tensor | None = None  # fp32 [S] DELLA row length − 1
    topk: bool = False
    eqb: torch.Tensor | None = None  # int64 [P, T] equal entries before each tile (TOPK)
    room: torch.Tensor | None = None  # int64 [S, T] equal entries kept (TOPK)
    big: bool = False  # some element index ≥ 2^32


def _mask_args(m: MaskTables, dummy_f: torch.Tensor, dummy_i: torch.Tensor) -> list:
    f = lambda v: dummy_f if v is None else v  # noqa: E731
    i = lambda v: dummy_i if v is None else v  # noqa: E731
    ranks = m.ranks if m.ranks is not None else dummy_i.to(torch.int32)
    whole = m.whole if m.whole is not None else dummy_i.to(torch.int8)
    return [
        f(m.lo), f(m.hi), whole, i(m.k0), i(m.k1h), i(m.k1), i(m.pth),
        ranks, ranks.stride(0) if ranks.dim() == 2 else 0, f(m.plo), f(m.pspan), f(m.nm1), i(m.eqb), i(m.room),
    ]


def _dummies(device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, dtype=torch.float32, device=device), torch.zeros(1, dtype=torch.int64, device=device)


def _check(x: torch.Tensor, base: torch.Tensor, segs: Segments) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or not base.is_contiguous() or base.dim() != 1:
        raise ValueError("kernels: x must be [T, N] with contiguous rows and base a contiguous [N]")
    if segs.total > min(x.shape[1], base.numel()):
        raise ValueError(f"kernels: segments reach element {segs.total}, the rows have {x.shape[1]}")


def l1_norms(
    x: torch.Tensor, base: torch.Tensor, segs: Segments, mask: MaskTables, tiles: Tiles | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """(‖δ_t‖₁, ‖k_t·δ_t‖₁) per segment and model, fp64 [S, T, 2]: per-tile fp32 partial sums (≤ 2048
    terms each), then a fixed-order fp64 sum per segment. torch sums the whole tensor in fp32 with its
    own blocking, so the two agree to a few fp32 ulps, not bit for bit."""
    _check(x, base, segs)
    BLOCK, warps = default_block(block)
    tiles = tiles or make_tiles(segs, BLOCK, x.device)
    T = x.shape[0]
    part = torch.empty((tiles.count, T, 2), dtype=torch.float32, device=x.device)
    start, end, idx0 = seg_tables(segs, x.device)
    df, di = _dummies(x.device)
    if tiles.count:
        _l1_kernel[(tiles.count,)](
            x, x.stride(0), base, part, tiles.seg, tiles.start, start, end, idx0,
            *_mask_args(mask, df, di), T,
            MASK=mask.kind, TOPK=mask.topk, BIG=mask.big, BLOCK=tiles.block, num_warps=warps, enable_fp_fusion=False,
        )
    return segment_sums(part.view(tiles.count, T * 2), tiles, segs).view(segs.count, T, 2)


def segment_sums(part: torch.Tensor, tiles: Tiles, segs: Segments) -> torch.Tensor:
    """[S, C] fp64: the rows of ``part`` [P, C] summed per segment, in a fixed order (``tiles``' own
    per-segment first tile and tile count: device tables copied with the tiles, no host round trip)."""
    C = part.shape[1]
    out = torch.zeros((segs.count, C), dtype=torch.float64, device=part.device)
    if segs.count and C and tiles.count:
        _segsum_kernel[(segs.count, C)](part.contiguous(), tiles.seg_first, tiles.seg_ntiles, out, C, BLOCK=256)
    return out


def rescale_ratio(norms: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """fp32 [S, T]: ‖δ‖₁/‖k·δ‖₁ where both are ≥ 1e-7 and the model is sparsified (``active``), else 1
    (mergekit's guard, ``methods.gta.l1_rescaled``), from the fp64 sums rounded to fp32 first."""
    before, after = norms[..., 0].float(), norms[..., 1].float()
    skip = (before < 1e-7) | (after < 1e-7) | ~active
    return torch.where(skip, torch.ones_like(before), before / after)


def tie_counts(x: torch.Tensor, base: torch.Tensor, segs: Segments, thr: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """int64 [P, T]: per tile and model, the entries with |δ| equal to the segment's threshold ``thr``
    [S, T] (one extra read of the data: exact-k ranks the tied entries by index)."""
    T = x.shape[0]
    cnt = torch.empty((tiles.count, T), dtype=torch.int64, device=x.device)
    start, end, _ = seg_tables(segs, x.device)
    if tiles.count:
        _eqcount_kernel[(tiles.count,)](
            x, x.stride(0), base, cnt, tiles.seg, tiles.start, start, end, thr.contiguous(), T, BLOCK=tiles.block,
            enable_fp_fusion=False,
        )
    return cnt


def tie_prefix(cnt: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """int64 [P, T]: tied entries in the tiles before each tile, within its segment (exclusive prefix)."""
    if tiles.count == 0:
        return cnt
    excl = torch.cumsum(cnt, 0) - cnt
    return (excl - excl[tiles.first]).contiguous()


def gta_merge(
    x: torch.Tensor,
    base: torch.Tensor,
    out: torch.Tensor,
    segs: Segments,
    weight: torch.Tensor,
    lam: torch.Tensor,
    mask: MaskTables,
    *,
    consensus: str | None,
    normalize: bool,
    div: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    tiles: Tiles | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The fused pass over a packed batch. ``weight`` fp32 [S, T]; ``lam`` fp32 [S]; ``div`` fp32 [S] (the
    divisor without consensus, already guarded); ``scale`` fp32 [S, T] rescale ratios or None."""
    _check(x, base, segs)
    if out.dim() != 1 or not out.is_contiguous() or out.numel() < segs.total:
        raise ValueError("kernels: out must be a contiguous [N] tensor")
    T = x.shape[0]
    BLOCK, warps = merge_block(T, block)
    tiles = tiles or make_tiles(segs, BLOCK, x.device, aligned=True)
    if not tiles.aligned:
        raise ValueError("kernels: the fused pass takes an aligned tile table (make_tiles(..., aligned=True))")
    if tiles.count == 0:
        return out
    start, end, idx0 = seg_tables(segs, x.device)
    df, di = _dummies(x.device)
    _gta_kernel[(persistent_grid(tiles.count, x.device),)](
        x, x.stride(0), base, out_arg(out), tiles.seg, tiles.start, start, end, idx0, tiles.count,
        weight.contiguous(), df if scale is None else scale.contiguous(), lam.contiguous(),
        df if div is None else div.contiguous(),
        *_mask_args(mask, df, di), T,
        MASK=mask.kind, CONSENSUS=CONSENSUS[consensus], NORMALIZE=bool(normalize), RESCALE=scale is not None,
        TOPK=mask.topk, BIG=mask.big, OUT=OUT_CODES[out.dtype], BLOCK=tiles.block, num_warps=warps,
        enable_fp_fusion=False,
    )
    return out


# --------------------------------------------------------------------------------------------------
# a method's kernel plan for one batch


class GtaKernel:
    """The kernel plan of one method for a batch of G tensors ("groups") with T models each.

    Group-level tables are built on the host and reach the device with the launches' tables in one
    asynchronous copy (``prepare``; ``_common.HostPack``): nothing in a plan's construction, passes or
    merge blocks the host (gpu-design.md §5.2; tests/engine/test_gpu.py counts). Each launch covers
    segments of some groups (a whole packed batch, or one row chunk of a large tensor: ``groups[s]``
    names segment s's tensor). The caller runs

        kernel.prepare([(segs, groups), ...])     # optional: every launch's tables in the same copy
        for j in range(kernel.n_passes):          # full-data passes: selection, L1 norms
            for each launch: kernel.data_pass(j, x, base, segs, groups)
            kernel.end_pass(j)
        for each launch: kernel.merge(x, base, out, segs, groups)

    with every chunk of a tensor visited in element order in the merge (exact-k ranks ties by index).
    Subclasses (``kernels.ties``, ``dare``, ``della``, ``breadcrumbs``, ``linear``) fill the mask tables
    with HOST tensors; ``prepare`` moves them.
    """

    consensus: str | None = None
    normalize: bool = False
    rescale: bool = False
    #: MaskTables fields that are per-(segment, model) tables moved to the device by ``prepare``
    _MASK_TABLES = ("lo", "hi", "whole", "k0", "k1h", "k1", "pth", "plo", "pspan", "room")
    #: attributes of the plan itself moved by ``prepare`` (subclasses add theirs)
    _TABLES: tuple[str, ...] = ("weight", "lam", "div", "active_dev")

    def __init__(self, weight: list[list[float]], lam: list[float], div: list[float] | None, device) -> None:
        self.device = device
        self.G = len(weight)
        self.T = len(weight[0]) if weight else 0
        self.weight = torch.tensor(weight, dtype=torch.float32).reshape(self.G, self.T)
        self.lam = torch.tensor(lam, dtype=torch.float32)
        self.div = None if div is None else torch.tensor(div, dtype=torch.float32)
        self.mask = MaskTables()
        self.active = torch.zeros((self.G, self.T), dtype=torch.bool)  # sparsified models (rescaled if RESCALE), host
        self.active_dev: torch.Tensor | None = None  # the same on the device (``prepare``)
        self.scale: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.passes: list[str] = []
        self._prepared = False
        self._launch: dict[tuple, torch.Tensor] = {}  # (segs, groups) -> device int64 group indices
        self._new_sweep()

    # -- the device tables -------------------------------------------------------------------------
    def prepare(self, launches=()) -> None:
        """Copy the plan's tables (first call) and the tables of ``launches`` ((segs, groups) each: the group
        indices, segment and tile tables of every pass) to the device, in ONE asynchronous copy."""
        pack = HostPack(self.device)
        moves = []
        if not self._prepared:
            self.active_dev = self.active
            for owner, names in ((self, self._TABLES), (self.mask, self._MASK_TABLES)):
                for name in names:
                    v = getattr(owner, name)
                    if isinstance(v, torch.Tensor):
                        moves.append((owner, name, pack.add(v)))
        dones, keys = [], []
        for segs, groups in launches:
            key = (segs, None if groups is None else tuple(int(i) for i in groups))
            if key in self._launch:
                continue
            g = list(range(segs.count)) if groups is None else list(key[1])
            if len(g) != segs.count:
                raise ValueError(f"kernels: {segs.count} segments but {len(g)} group indices")
            keys.append((key, pack.add(g, torch.int64)))
            dones.append(prepare_launch(pack, segs, self._launch_tiles(segs)))
        views = pack.upload()
        for owner, name, i in moves:
            setattr(owner, name, views[i])
        for key, i in keys:
            self._launch[key] = views[i]
        for done in dones:
            done(views)
        if not self._prepared:
            self._prepared = True
            self._on_device()

    def _launch_tiles(self, segs: Segments) -> list[tuple[int, bool]]:
        """(block, aligned) of the tile tables this plan's launches use (merge; L1 pass)."""
        out = [(merge_block(self.T)[0], True)]
        if "l1" in self.passes or self.mask.topk:
            out.append((default_block()[0], False))
        return out

    def _l1_tiles(self, segs: Segments, device, block=None) -> Tiles:
        """The L1 pass's tile table (its per-tile fp32 partial sums: ≤ BLOCK terms each)."""
        return make_tiles(segs, default_block(block)[0], device)

    def _on_device(self) -> None:
        """Hook: the tables are on the device (subclasses start device state here)."""

    # -- the passes ------------------------------------------------------------------------------
    @property
    def n_passes(self) -> int:
        return len(self.passes)

    def _any_active(self) -> bool:
        return bool(self.active.numpy().any())  # host flags (numpy: no tensor truth value inside a unit)

    def _finish_init(self) -> None:
        """Called by subclasses once the mask tables are set: decides the passes."""
        if self.rescale and self._any_active():
            self.passes.append("l1")
            self.norms = torch.zeros((self.G, self.T, 2), dtype=torch.float64, device=self.device)

    def order_free(self, j: int) -> bool:
        """Pass ``j``'s result does not depend on the order of its launches (a selection pass adds counts to
        histograms; the L1 pass with exact-k ranks and the merge need element order): the GPU engine runs
        such passes over a tensor's chunks backwards every other time, starting with the resident chunk."""
        return self.passes[j].startswith("select")

    def data_pass(self, j: int, x: torch.Tensor, base: torch.Tensor, segs: Segments, groups=None, block=None) -> None:
        kind = self.passes[j]
        g = self._groups(segs, groups)
        if kind == "l1":
            tiles = self._l1_tiles(segs, x.device, block)
            mask = self._seg_mask(g, segs, x, base, block, tiles)
            sums = l1_norms(x, base, segs, mask, tiles=tiles, block=block)
            self.norms.index_add_(0, g, sums)  # each group at most once per launch: deterministic
        else:
            self._select_pass(kind, x, base, segs, g, block)

    def end_pass(self, j: int) -> None:
        kind = self.passes[j]
        self._new_sweep()
        if kind == "l1":
            self.scale = rescale_ratio(self.norms, self.active_dev)
        else:
            self._end_select(kind)

    def merge(self, x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, segs: Segments, groups=None,
              block: int | None = None) -> torch.Tensor:
        g = self._groups(segs, groups)
        BLOCK, _ = merge_block(x.shape[0], block)
        tiles = make_tiles(segs, BLOCK, x.device, aligned=True)
        mask = self._seg_mask(g, segs, x, base, block, tiles)
        return gta_merge(
            x, base, out, segs, self.weight[g], self.lam[g], mask, consensus=self.consensus,
            normalize=self.normalize, div=None if self.div is None else self.div[g],
            scale=None if self.scale is None else self.scale[g], tiles=tiles, block=block,
        )

    def run(self, x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, segs: Segments, block: int | None = None):
        """Every pass then the merge over one packed batch (segment s = group s)."""
        self.prepare([(segs, None)])
        for j in range(self.n_passes):
            self.data_pass(j, x, base, segs, block=block)
            self.end_pass(j)
        return self.merge(x, base, out, segs, block=block)

    # -- hooks -------------------------------------------------------------------------------------
    def _groups(self, segs: Segments, groups) -> torch.Tensor:
        """The device group indices of a launch (from ``prepare``, or one asynchronous copy now)."""
        key = (segs, None if groups is None else tuple(int(i) for i in groups))
        if key not in self._launch:
            self.prepare([(segs, groups)])
        return self._launch[key]

    def _seg_mask(self, g, segs, x, base, block, tiles=None) -> MaskTables:
        """The mask tables of one launch's segments (group tables indexed by ``g``)."""
        m = self.mask
        pick = lambda v: None if v is None else v[g].contiguous()  # noqa: E731
        return dataclasses.replace(
            m, lo=pick(m.lo), hi=pick(m.hi), whole=pick(m.whole), k0=pick(m.k0), k1h=pick(m.k1h), k1=pick(m.k1), pth=pick(m.pth),
            plo=pick(m.plo), pspan=pick(m.pspan), nm1=pick(m.nm1), room=pick(m.room),
            big=segs.max_index() >= 1 << 32,
        )

    def _new_sweep(self) -> None:
        """A new sweep over the tensors' chunks starts (per-sweep running state, e.g. exact-k ranks)."""

    def _select_pass(self, kind, x, base, segs, g, block) -> None:
        raise AssertionError(kind)

    def _end_select(self, kind) -> None:
        raise AssertionError(kind)


def weight_rows(params: list, attr: str = "weight") -> list[list[float]]:
    return [list(getattr(p, attr)) for p in params]
