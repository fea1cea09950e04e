"""Numerical building blocks shared by methods (torch everywhere; fused Triton kernels on CUDA)."""

from .randomized_svd import (
    CenteredFactors,
    centered_factors,
    centered_lowrank_merge,
    randomized_svd,
    reconstruct_add,
    target_rank,
    weight_average,
)

__all__ = [
    "CenteredFactors", "centered_factors", "centered_lowrank_merge", "randomized_svd", "reconstruct_add",
    "target_rank", "weight_average",
]
