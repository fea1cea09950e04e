"""Numerical building blocks shared by methods (torch everywhere; fused Triton kernels on CUDA).

``fastmerge.ops.randomized_svd`` is the module (its function of the same name is
``fastmerge.ops.randomized_svd.randomized_svd``; it is not re-exported here, so that the attribute
``fastmerge.ops.randomized_svd`` stays the module)."""

from . import randomized_svd
from .randomized_svd import (
    CenteredFactors,
    centered_factors,
    centered_lowrank_merge,
    reconstruct_add,
    target_rank,
    weight_average,
)

__all__ = [
    "randomized_svd", "CenteredFactors", "centered_factors", "centered_lowrank_merge", "reconstruct_add",
    "target_rank", "weight_average",
]
