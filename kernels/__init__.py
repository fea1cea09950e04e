"""Triton kernels, shipped as ``fastmerge.kernels`` (never a top-level ``kernels``: a PyPI package has
that name). No method has a Triton kernel in this release; ``fastmerge.backends.triton`` reports so.
This module must import nothing that talks to a GPU driver (it is imported on CPU-only machines)."""
