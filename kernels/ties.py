"""TIES on the GPU: exact per-tensor selection (``select``) + the fused consensus pass (``gta``).

``fastmerge.methods.ties`` is the specification. Per tensor and model with density < 1:
k = max(1, ⌊density·numel⌋); the k-th largest |δ| is found exactly (the value ``torch.kthvalue``
returns): for whole tensors by the one-read bracket selection (``select_bracket``: a 1/16 sample, one
counting pass, a rank select among the candidates), for row chunks by three radix-select passes. The
fused pass keeps |δ| ≥ it (``selection: threshold``, boundary ties kept) or exactly k entries, boundary
ties in index order (``selection: topk``): each merge tile needs the tied entries of the tiles before
it. Whole tensors count them per tile among the count pass's candidates (stored per tile in index
order; ≤ BLOCK keys per tile and model, read from L2, not the tile's T + 1 rows), then a device cumsum;
row chunks count them with one extra read per launch (``gta.tie_counts``). ``rescale: true`` adds one
pass for the two L1 norms (with topk over the merge's tiles, which reuses the same tie counts). Whole ties =
1 read (+1 with rescale) + 1 for the merge of base + T models, against the reference's materialised fp32
deltas, kthvalue and ~10 full-size temporaries per model.

Default mode only: ``mergekit_compat`` (bf16 arithmetic, argsort order) stays on the torch backend.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastmerge.methods.ties import TiesParams, keep_count

from ._common import Segments, Tiles, default_block, make_tiles, merge_block, numels
from .gta import MASK_BAND, GtaKernel, tie_counts, tie_prefix, weight_rows
from .select import Selection


def batch_key(p: TiesParams) -> tuple:
    """Tensors whose params share this key can share a launch (these are compile-time constants)."""
    return ("ties", p.election, p.normalize, p.rescale, p.selection)


class TiesKernel(GtaKernel):
    @staticmethod
    def key(method, p: TiesParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return batch_key(p)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "TiesKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``)."""
        return cls(params, numels(shapes), device)

    def __init__(self, params: Sequence[TiesParams], numels: Sequence[int], device) -> None:
        keys = {batch_key(p) for p in params}
        if len(keys) != 1:
            raise ValueError(f"ties kernel: one launch needs one election/normalize/rescale/selection, got {keys}")
        p0 = params[0]
        super().__init__(weight_rows(list(params)), [p.lambda_ for p in params], None, device)
        self.consensus, self.normalize, self.rescale = p0.election, p0.normalize, p0.rescale
        self.topk = p0.selection == "topk"
        k = torch.zeros((self.G, self.T, 1), dtype=torch.int64)
        for gi, (p, n) in enumerate(zip(params, numels)):
            for t, d in enumerate(p.density):
                if d < 1 and n > 0:
                    k[gi, t, 0] = keep_count(d, n)
        self.active = k[..., 0] > 0
        self.mask.kind = MASK_BAND
        self.mask.topk = self.topk
        # density >= 1: kept whole, an explicit flag (a selected threshold may itself be NaN: then nothing is kept)
        self.mask.whole = (~self.active).to(torch.int8)  # host tables: ``prepare`` copies them (one async copy)
        self.mask.lo = torch.zeros((self.G, self.T))  # filled in by the selection
        self.mask.hi = torch.full((self.G, self.T), float("inf"))
        self.sel: Selection | None = None
        self._cand_ties: dict[tuple, torch.Tensor] = {}  # (segs, block, aligned) -> per-tile tie counts
        if self._any_active():
            # whole tensors: one-read bracket selection; exact-k keeps its candidates to rank the ties in the merge
            self.sel = Selection.start(k, device, numel=numels, tiles_out=self.topk)
            self.passes += [f"select{j}" for j in range(len(self.sel.schedule))]
        self._finish_init()

    def _new_sweep(self) -> None:
        self._running = torch.zeros((self.G, self.T), dtype=torch.int64, device=self.device)

    def _l1_tiles(self, segs: Segments, device, block=None) -> Tiles:
        # exact-k: the merge's tiles, so the L1 pass ranks its ties with the merge's tie counts (from the
        # bracket's candidates for whole tensors) instead of reading the data once more for its own tiles
        if self.topk:
            return make_tiles(segs, merge_block(self.T, block)[0], device, aligned=True)
        return super()._l1_tiles(segs, device, block)

    def _launch_tiles(self, segs: Segments) -> list[tuple[int, bool]]:
        if self.topk:
            return [(merge_block(self.T)[0], True)]  # the merge's, the L1 pass's (``_l1_tiles``)
        return super()._launch_tiles(segs)

    def _select_pass(self, kind, x, base, segs, g, block) -> None:
        self.sel.histogram(int(kind[-1]), x, base, segs, groups=g, block=block)

    def _end_select(self, kind) -> None:
        j = int(kind[-1])
        self.sel.scan(j)
        if j == len(self.sel.schedule) - 1:
            act = self.active_dev
            self.mask.lo = torch.where(act, self.sel.values[..., 0], torch.zeros_like(self.mask.lo)).contiguous()
            # entries equal to the threshold that exact-k keeps: k − #(|δ| > th), where NaN |δ| (above th in
            # the selection's order) do not compare greater (the reference's `mag > threshold`, the C++ kernel)
            self.mask.room = (self.sel.k[..., 0] + self.sel.nan).contiguous()

    def _seg_mask(self, g, segs, x, base, block, tiles=None):
        m = super()._seg_mask(g, segs, x, base, block, tiles)
        if not self.topk:
            return m
        tiles = tiles or make_tiles(segs, default_block(block)[0], x.device)
        if self.sel is None:  # every model kept whole: nothing is ranked
            cnt = torch.zeros((tiles.count, self.T), dtype=torch.int64, device=x.device)
        else:
            # whole tensors: counted once among the bracket's candidates (no read of the data), kept for the
            # L1 pass and the merge (same tiles); row chunks: one read of the data per launch
            key = (segs, tiles.block, tiles.aligned)
            cnt = self._cand_ties.get(key)
            if cnt is None:
                cnt = self.sel.tile_ties(x, base, segs, tiles)
                if cnt is not None:
                    self._cand_ties[key] = cnt
                    self.sel.release()  # the candidates are no longer needed
            if cnt is None:
                cnt = tie_counts(x, base, segs, m.lo, tiles)
        # ranks continue across the chunks of one tensor: add the tied entries of its earlier chunks
        m.eqb = (tie_prefix(cnt, tiles) + self._running[g][tiles.seg.long()]).contiguous()
        seg_tot = torch.zeros((segs.count, self.T), dtype=torch.int64, device=x.device)
        seg_tot.index_add_(0, tiles.seg.long(), cnt)  # integer sums: exact in any order
        self._running.index_add_(0, g, seg_tot)
        return m


def ties_merge(
    x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, segs: Segments, params: Sequence[TiesParams],
    block: int | None = None,
) -> torch.Tensor:
    """Merge a packed batch (segment s = one whole tensor with ``params[s]``) into ``out``."""
    return TiesKernel(params, segs.numel, x.device).run(x, base, out, segs, block=block)
