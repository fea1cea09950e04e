"""PEFT's ``peft.utils.merge_utils`` functions with PEFT's exact semantics (task tensors stacked on dim 0;
exactly-k magnitude pruning by ``topk``; the sign election on the *unweighted* pruned tensors; a disjoint
mean over an unweighted count; DARE masks from ``torch.bernoulli`` on the global generator, drawn in the
same order, so a seed gives PEFT's masks), without PEFT. Used by ``lora.adapters`` (adapter merging).

Same results as PEFT's functions bit for bit (tests/lora/test_adapters.py), with fewer full-size temporaries:
the weights are applied while summing instead of on a stacked copy, and the sign mask is computed once.
"""

from __future__ import annotations

import warnings
from typing import Sequence

from .._lazy import torch


def _w(weights: Sequence[float] | torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(list(weights))
    return w.to(t.device).view(w.shape + (1,) * (t.dim() - w.dim()))


def _kth_largest_abs(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| as a 0-d tensor: the native radix select on contiguous CPU floats (one read, no
    sort; ``_native.kth_largest_abs_diff``), else ``torch.kthvalue``."""
    flat = tensor.reshape(-1)
    if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            from .. import _native

            return torch.tensor(_native.kth_largest_abs_diff(flat, None, k), dtype=torch.float32)
        except (ImportError, RuntimeError):
            pass
    return torch.kthvalue(flat.abs().float(), flat.numel() - k + 1).values


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's exactly-k magnitude pruning, bit for bit (``_magnitude_pruning`` with topk deciding ties)."""
    return _magnitude_pruning(tensor, density, topk_ties=True)


def _magnitude_pruning(tensor: torch.Tensor, density: float, topk_ties: bool) -> torch.Tensor:
    """PEFT's exactly-k magnitude pruning. PEFT keeps ``topk(|x|, k)``, a sort of every element (28 s for 8
    tensors of 2048×5632 on the busy 2-core machine); the k-th largest |x| by selection (the native radix
    select, one read) and ``|x| ≥ t`` give the same set whenever exactly k elements pass, which is checked.
    Otherwise (ties at the threshold, NaN) PEFT's topk decides (``topk_ties``), so the result is PEFT's bit for
    bit; or, with ``topk_ties=False``, the tied elements are cut by index order (the first ones kept): the same
    magnitudes, without topk's full sort. Ties at the k-th |x| are common: 13 of 56 fp32 ΔW's of a 1B-shaped
    layer (11.5M elements, density 0.5) had one, and their topk fallbacks were 8.7 of the 20 s of a ties_svd."""
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    if 0 < k < flat.numel():
        t = _kth_largest_abs(tensor, k)
        mag = flat.abs()
        keep = mag >= t.to(flat.dtype)  # t is one of the |x|: exact in their dtype
        n = int(torch.count_nonzero(keep))
        if n == k:
            return tensor * keep.to(tensor.dtype).reshape(tensor.shape)
        if not topk_ties and n > k and not bool(torch.isnan(t)):
            tied = torch.nonzero(mag == t.to(flat.dtype)).reshape(-1)
            keep[tied[tied.numel() - (n - k):]] = False
            return tensor * keep.to(tensor.dtype).reshape(tensor.shape)
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    return _prune(tensor, density, method, rescale, topk_ties=True)


def _prune(tensor: torch.Tensor, density: float, method: str, rescale: bool, topk_ties: bool) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=2)
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return _magnitude_pruning(tensor, density, topk_ties)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: str = "total") -> torch.Tensor:
    sign = tensor.sign()
    if method == "total":
        mag = tensor.sum(dim=0)
    elif method == "frequency":
        mag = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return sign == torch.where(mag >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def _weighted_sum(stacked: torch.Tensor, weights) -> torch.Tensor:
    return (stacked * _w(weights, stacked)).sum(dim=0)


def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights) -> torch.Tensor:
    return _weighted_sum(torch.stack(list(task_tensors), dim=0), weights)


def magnitude_prune(task_tensors: Sequence[torch.Tensor], weights, density: float) -> torch.Tensor:
    return magnitude_prune_index_ties(task_tensors, weights, density, topk_ties=True)


def magnitude_prune_index_ties(task_tensors: Sequence[torch.Tensor], weights, density: float, topk_ties: bool = False) -> torch.Tensor:
    """``magnitude_prune`` with ties at each tensor's threshold cut by index order (``_magnitude_pruning``)."""
    return _weighted_sum(torch.stack([_prune(t, density, "magnitude", False, topk_ties) for t in task_tensors], dim=0), weights)


def _ties_of(stacked: torch.Tensor, weights, majority_sign_method: str) -> torch.Tensor:
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(stacked * _w(weights, stacked), mask)


def ties(task_tensors: Sequence[torch.Tensor], weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    return ties_index_ties(task_tensors, weights, density, majority_sign_method, topk_ties=True)


def ties_index_ties(task_tensors: Sequence[torch.Tensor], weights, density: float, majority_sign_method: str = "total",
                    topk_ties: bool = False) -> torch.Tensor:
    """``ties`` with ties at each tensor's magnitude threshold cut by index order (``_magnitude_pruning``)."""
    stacked = torch.stack([_prune(t, density, "magnitude", False, topk_ties) for t in task_tensors], dim=0)
    return _ties_of(stacked, weights, majority_sign_method)


def dare_linear(task_tensors: Sequence[torch.Tensor], weights, density: float) -> torch.Tensor:
    return _weighted_sum(torch.stack([prune(t, density, "random", rescale=True) for t in task_tensors], dim=0), weights)


def dare_ties(task_tensors: Sequence[torch.Tensor], weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    stacked = torch.stack([prune(t, density, "random", rescale=True) for t in task_tensors], dim=0)
    return _ties_of(stacked, weights, majority_sign_method)


#: combination type of ``add_weighted_adapter`` -> the function applied to its task tensors
FUNCTIONS = {
    "linear": task_arithmetic, "svd": task_arithmetic, "ties": ties, "ties_svd": ties, "dare_linear": dare_linear,
    "dare_linear_svd": dare_linear, "dare_ties": dare_ties, "dare_ties_svd": dare_ties, "magnitude_prune": magnitude_prune,
    "magnitude_prune_svd": magnitude_prune,
}
