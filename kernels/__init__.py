"""Triton kernels, shipped as ``fastmerge.kernels`` (never a top-level ``kernels``: a PyPI package has
that name). ``kernels/cart.py`` (CART's fused centered sketch and reconstruct-and-add) runs inside
``fastmerge.ops.randomized_svd`` on CUDA; no merge method is dispatched to the Triton backend yet.
This module must import nothing that talks to a GPU driver (it is imported on CPU-only machines)."""
