"""Model Breadcrumbs on the GPU (breadcrumbs, breadcrumbs_ties): a band of magnitudes, two exact selections.

``fastmerge.methods.breadcrumbs`` is the specification (``selection: threshold``). Per tensor and
model with density < 1: n_top = ⌊γ·N⌋, target = ⌊density·N⌋, n_bot = max(0, N − target − n_top); the
band's upper bound is the (n_bot + target)-th smallest |δ| and its lower bound the (n_bot + 1)-th
smallest, i.e. the k-th largest for k = N − n_bot − target + 1 and k = N − n_bot: two queries of one
``select`` run (both histograms fill from the same read of the data). Entries with lo ≤ |δ| ≤ hi are
kept (no lower bound when n_bot = 0, nothing when target = 0).

``selection: topk`` (exact count, index order at both bounds) and ``mergekit_compat`` stay on the torch
backend.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastmerge.methods.breadcrumbs import BreadcrumbsParams, band

from ._common import Segments, numels
from .dare import no_consensus_divisor
from .gta import MASK_BAND, GtaKernel, weight_rows
from .select import Selection


def batch_key(p: BreadcrumbsParams, consensus: str | None) -> tuple:
    return ("breadcrumbs", consensus, p.normalize, p.rescale, p.selection)


class BreadcrumbsKernel(GtaKernel):
    _TABLES = GtaKernel._TABLES + ("_needs_dev", "_has_lo_dev")

    @staticmethod
    def key(method, p: BreadcrumbsParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return batch_key(p, method.consensus)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "BreadcrumbsKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``)."""
        return cls(params, numels(shapes), device, method.consensus)

    def __init__(self, params: Sequence[BreadcrumbsParams], numels: Sequence[int], device, consensus: str | None) -> None:
        keys = {batch_key(p, consensus) for p in params}
        if len(keys) != 1:
            raise ValueError(f"breadcrumbs kernel: one launch needs one normalize/rescale/selection, got {keys}")
        p0 = params[0]
        if p0.selection != "threshold":
            raise ValueError("breadcrumbs kernel: selection 'topk' runs on the torch backend")
        div = None if consensus is not None else [no_consensus_divisor(p.weight, p.normalize) for p in params]
        super().__init__(weight_rows(list(params)), [p.lambda_ for p in params], div, device)
        self.consensus, self.rescale, self.normalize = consensus, p0.rescale, p0.normalize
        k = torch.zeros((self.G, self.T, 2), dtype=torch.int64)  # [.., 0]: upper bound, [.., 1]: lower bound
        lo = torch.zeros((self.G, self.T))
        hi = torch.full((self.G, self.T), float("inf"))
        self._has_lo = torch.zeros((self.G, self.T), dtype=torch.bool)
        for g, (p, n) in enumerate(zip(params, numels)):
            for t, (d, gamma) in enumerate(zip(p.density, p.gamma)):
                if d >= 1:
                    continue
                self.active[g, t] = True
                n_bot, target = band(n, d, gamma)
                if target == 0 or n == 0:
                    lo[g, t], hi[g, t] = -1.0, -1.0  # nothing kept (|δ| <= -1 never holds)
                    continue
                lo[g, t] = -1.0  # no lower bound unless n_bot > 0
                k[g, t, 0] = n - n_bot - target + 1
                if n_bot > 0:
                    k[g, t, 1] = n - n_bot
                    self._has_lo[g, t] = True
        self._needs = k[..., 0] > 0
        self._needs_dev, self._has_lo_dev = self._needs, self._has_lo  # host until ``prepare`` copies them
        self.mask.kind = MASK_BAND
        self.mask.lo, self.mask.hi = lo, hi  # host tables: ``prepare`` copies them (one async copy)
        # density >= 1: kept whole, an explicit flag (a selected bound may itself be NaN: then nothing is kept)
        self.mask.whole = (~self.active).to(torch.int8)
        self.sel: Selection | None = None
        if bool(self._needs.numpy().any()):
            self.sel = Selection.start(k, device, numel=numels)  # whole tensors: one-read bracket selection
            self.passes += [f"select{j}" for j in range(len(self.sel.schedule))]
        self._finish_init()

    def _select_pass(self, kind, x, base, segs, g, block) -> None:
        self.sel.histogram(int(kind[-1]), x, base, segs, groups=g, block=block)

    def _end_select(self, kind) -> None:
        j = int(kind[-1])
        self.sel.scan(j)
        if j == len(self.sel.schedule) - 1:
            v = self.sel.values
            needs, has_lo = self._needs_dev, self._has_lo_dev
            self.mask.hi = torch.where(needs, v[..., 0], self.mask.hi).contiguous()
            self.mask.lo = torch.where(has_lo, v[..., 1], self.mask.lo).contiguous()


def breadcrumbs_merge(
    x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, segs: Segments, params: Sequence[BreadcrumbsParams],
    consensus: str | None, block: int | None = None,
) -> torch.Tensor:
    """Merge a packed batch (segment s = one whole tensor with ``params[s]``): breadcrumbs (consensus
    None) or breadcrumbs_ties ("sum")."""
    return BreadcrumbsKernel(params, segs.numel, x.device, consensus).run(x, base, out, segs, block=block)
