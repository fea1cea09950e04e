"""DARE on the GPU (dare_linear, dare_ties): counter-based Bernoulli masks in the fused pass.

``fastmerge.methods.dare`` is the specification. Model t of a tensor keeps element i iff
h(seed, hash(tensor name), t, i) < ceil(fp32(density)·2^24)·256 (``_rng``: bit for bit the torch
backend's mask, also across row chunks, whose segments carry the index of their first element).
``rescale: true`` (the default) needs the two L1 norms of every task vector first: one pass that
draws the masks and sums, then the fused pass draws them again (~26 integer ops per element and
model; cheaper than storing and re-reading a mask). Without rescale: one pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastmerge.methods.dare import DareParams
from fastmerge.methods.linear import weight_divisor

from . import _rng
from ._common import Segments, numels
from .gta import MASK_BERNOULLI, GtaKernel, weight_rows


def batch_key(p: DareParams, consensus: str | None) -> tuple:
    return ("dare", consensus, p.normalize, p.rescale)


def no_consensus_divisor(weight: Sequence[float], normalize: bool) -> float:
    """The divisor of the consensus-free tail (``methods.gta.combine``): Σw, or 1 if |Σw| < 1e-8 or no normalize."""
    if not normalize:
        return 1.0
    div = weight_divisor(weight, True)
    return 1.0 if abs(div) < 1e-8 else div


def stream_tables(seeds_keys: Sequence[tuple[int, int]], T: int) -> tuple[torch.Tensor, ...]:
    """(k0, mix32(k1), k1) int64 [G, T] host tables for the (seed, tensor key) of each group and model index t
    (the kernel plan's ``prepare`` copies them to the device with its other tables)."""
    rows = [[_rng.stream_table(seed, key, t) for t in range(T)] for seed, key in seeds_keys]
    k = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), T, 3)
    return tuple(k[..., j].contiguous() for j in range(3))


class DareKernel(GtaKernel):
    @staticmethod
    def key(method, p: DareParams) -> tuple:
        """Compile-time flags of a launch: tensors of equal key share one (``MergeMethod.triton``)."""
        return batch_key(p, method.consensus)

    @classmethod
    def for_batch(cls, method, params, shapes, device, in_dtypes=None, base_dtype=None) -> "DareKernel":
        """The plan for a batch of tensors (``backends.triton.make_kernel``)."""
        return cls(params, numels(shapes), device, method.consensus)

    def __init__(self, params: Sequence[DareParams], numels: Sequence[int], device, consensus: str | None) -> None:
        keys = {batch_key(p, consensus) for p in params}
        if len(keys) != 1:
            raise ValueError(f"dare kernel: one launch needs one normalize/rescale, got {keys}")
        p0 = params[0]
        div = None if consensus is not None else [no_consensus_divisor(p.weight, p.normalize) for p in params]
        super().__init__(weight_rows(list(params)), [p.lambda_ for p in params], div, device)
        self.consensus, self.rescale, self.normalize = consensus, p0.rescale, p0.normalize
        pth = torch.full((self.G, self.T), -1, dtype=torch.int64)
        for g, p in enumerate(params):
            for t, d in enumerate(p.density):
                thr = _rng.scalar_threshold(d) if d < 1 else None
                if thr is not None:
                    pth[g, t] = thr
                self.active[g, t] = d < 1  # the reference rescales every model with density < 1
        self.mask.kind = MASK_BERNOULLI
        self.mask.pth = pth
        self.mask.k0, self.mask.k1h, self.mask.k1 = stream_tables([(p.seed, p.key) for p in params], self.T)
        self._finish_init()


def dare_merge(
    x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, segs: Segments, params: Sequence[DareParams],
    consensus: str | None, block: int | None = None,
) -> torch.Tensor:
    """Merge a packed batch (segment s = one whole tensor with ``params[s]``): dare_linear (consensus
    None) or dare_ties ("sum")."""
    return DareKernel(params, segs.numel, x.device, consensus).run(x, base, out, segs, block=block)
