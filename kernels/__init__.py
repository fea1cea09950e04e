"""Triton kernels, shipped as ``fastmerge.kernels`` (never a top-level ``kernels``: a PyPI package has
that name). This module must import nothing that talks to a GPU driver (it is imported on CPU-only
machines); the submodules import triton.

- ``_common``: the packed batch layout (segments, tile tables), block sizes, exact bf16 rounding on store
- ``_rng``: ``fastmerge.methods.rng``'s counter-based generator, bit for bit
- ``select``: exact k-th largest |x − base| per tensor and model (radix select, no sort)
- ``gta``: the fused mask/rescale/weight/consensus/λ/+base pass and its driver (``GtaKernel``)
- ``ties``, ``dare``, ``della``, ``breadcrumbs``, ``linear`` (+ task_arithmetic), ``slerp``,
  ``model_stock`` (+ ``sphere``: Gram matrices): one kernel plan per method, dispatched by
  ``fastmerge.backends.triton`` and batched/streamed by ``fastmerge.gpu_runner``
- ``cart``: CART's fused centered sketch and reconstruct-and-add (``fastmerge.ops.randomized_svd``);
  other modules serve their own features (see their docstrings)
"""
