"""DELLA on the GPU (della, della_linear): rank-dependent keep probabilities in the fused pass.

``fastmerge.methods.della`` is the specification. The ranks of |δ| within each row are a sort by
nature; they come from torch (stable ``argsort`` per row on the GPU, the CPU radix path for 16-bit
keys on the host: both give equal keys in index order, so the same ranks), written once as int32
[T, N]. Everything after them is fused: p = fl(lo + fl(span·fl(r/(n−1)))) in fp32 with IEEE division,
u from the shared counter-based generator, keep = u < p, the L1 rescale (its own pass) and the
consensus tail. The sort dominates: this kernel saves the reference's ~10 full-size temporaries per
model, not the ranking.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastmerge.methods.della import DellaParams, from_rows, row_ranks, to_rows

from ._common import HostPack, Segments
from .dare import no_consensus_divisor, stream_tables
from .gta import MASK_DELLA, GtaKernel, weight_rows


def batch_key(p: DellaParams, consensus: str | None) -> tuple:
    return ("della", consensus, p.normalize, p.rescale)


def key_dtypes(dtypes: Sequence[torch.dtype], base_dtype: torch.dtype) -> list[torch.dtype]:
    """``methods.della.rank_dtype`` per model from the original dtypes (16-bit when model and base share it)."""
    sixteen = (torch.bfloat16, torch.float16)
    return [d if d == base_dtype and d in sixteen else torch.float32 for d in dtypes]


def row_length(shape: Sequence[int]) -> int:
    """n of ``methods.della.to_rows``: 1-D → numel, otherwise dim 1."""
    if len(shape) < 2:
        n = 1
        for d in shape:
            n *= d
        return n
    return int(shape[1])


class DellaKernel(GtaKernel):
    @staticmethod
    def key(method, p: DellaParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return batch_key(p, method.consensus)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "DellaKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``): |δ| ranked at
        ``methods.della.rank_dtype`` of the original dtypes where they are known."""
        kd = key_dtypes(in_dtypes, base_dtype) if base_dtype is not None else None
        return cls(params, shapes, device, method.consensus, kd)

    def __init__(
        self, params: Sequence[DellaParams], shapes: Sequence[Sequence[int]], device, consensus: str | None,
        key_dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ) -> None:
        """``key_dtype``: the precision |δ| is ranked at (``methods.della.rank_dtype`` of the original
        inputs), one for all models or one per model; default: the packed rows' dtype if 16-bit and the
        base's, else fp32."""
        keys = {batch_key(p, consensus) for p in params}
        if len(keys) != 1:
            raise ValueError(f"della kernel: one launch needs one normalize/rescale, got {keys}")
        p0 = params[0]
        div = None if consensus is not None else [no_consensus_divisor(p.weight, p.normalize) for p in params]
        super().__init__(weight_rows(list(params)), [p.lambda_ for p in params], div, device)
        self.consensus, self.rescale, self.normalize = consensus, p0.rescale, p0.normalize
        self.key_dtype = key_dtype
        plo = torch.zeros((self.G, self.T))
        span = torch.zeros((self.G, self.T))
        for g, p in enumerate(params):
            for t, (d, e) in enumerate(zip(p.density, p.epsilon)):
                if d < 1:
                    plo[g, t] = d - e  # rounded once to fp32 from the double difference, as the reference
                    span[g, t] = 2 * e
                    self.active[g, t] = True
        self.mask.kind = MASK_DELLA
        self.mask.plo, self.mask.pspan = plo, span  # host tables: ``prepare`` copies them (one async copy)
        self.mask.whole = (~self.active).to(torch.int8)  # density >= 1: kept whole
        self.mask.k0, self.mask.k1h, self.mask.k1 = stream_tables([(p.seed, p.key) for p in params], self.T)
        self._cache: tuple | None = None
        self._finish_init()

    def _ranks(self, x: torch.Tensor, base: torch.Tensor, segs: Segments) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranks int32 [T, N], n − 1 fp32 [S]) of one launch (cached for the launch's L1 and merge passes)."""
        key = (x.data_ptr(), tuple(x.shape), base.data_ptr(), segs)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        if segs.shapes is None:
            raise ValueError("della kernel: segments need their shapes (rows are ranked)")
        T = x.shape[0]
        kd = self.key_dtype or (x.dtype if x.dtype == base.dtype and x.dtype in (torch.bfloat16, torch.float16) else torch.float32)
        kds = list(kd) if isinstance(kd, (list, tuple)) else [kd] * T
        ranks = torch.zeros((T, x.shape[1]), dtype=torch.int32, device=x.device)
        nm1 = []
        for a, n, shape in zip(segs.start, segs.numel, segs.shapes):
            b = base[a:a + n].float()
            for t in range(T):
                mag = (x[t, a:a + n].float() - b).abs().to(kds[t]).reshape(shape)
                rows = to_rows(mag)
                ranks[t, a:a + n] = from_rows(row_ranks(rows), torch.Size(shape)).reshape(-1)
            nm1.append(float(max(row_length(shape) - 1, 0)))
        pack = HostPack(x.device)  # one asynchronous copy, not a blocking torch.tensor(..., device=)
        pack.add(nm1, torch.float32)
        out = ranks, pack.upload()[0]
        self._cache = (key, *out)
        return out

    def _seg_mask(self, g, segs, x, base, block, tiles=None):
        m = super()._seg_mask(g, segs, x, base, block, tiles)
        m.ranks, m.nm1 = self._ranks(x, base, segs)
        return m


def della_merge(
    x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, segs: Segments, params: Sequence[DellaParams],
    consensus: str | None, block: int | None = None, key_dtype=None,
) -> torch.Tensor:
    """Merge a packed batch (segment s = one whole tensor with ``params[s]``, ``segs.shapes`` set): della
    (consensus "sum") or della_linear (None)."""
    return DellaKernel(params, segs.shapes, x.device, consensus, key_dtype).run(x, base, out, segs, block=block)
