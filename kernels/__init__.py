"""Triton kernels, shipped as ``fastmerge.kernels`` (never a top-level ``kernels``: a PyPI package has
that name). This module must import nothing that talks to a GPU driver (it is imported on CPU-only
machines); the submodules import triton.

- ``_common``: the packed batch layout (segments, tile tables), block sizes, exact bf16 rounding on store
- ``_rng``: ``fastmerge.methods.rng``'s counter-based generator, bit for bit
- ``select``: exact k-th largest |x − base| per tensor and model (radix select, no sort); ``select_bracket``:
  the same in one read of the data (sample → bracket → count → select among candidates)
- ``gta``: the fused mask/rescale/weight/consensus/λ/+base pass and its driver (``GtaKernel``)
- ``ties``, ``dare``, ``della``, ``breadcrumbs``, ``linear`` (+ task_arithmetic), ``slerp``,
  ``model_stock`` (+ ``sphere``: Gram matrices): one kernel plan per method, declared by their methods
  (``MergeMethod.triton``), run by ``fastmerge.backends.triton`` and ``fastmerge.engine.gpu``
- ``lowrank``: CART's fused centered sketch and reconstruct-and-add (``fastmerge.ops.randomized_svd``);
  other modules serve their own features (see their docstrings)

``interpreting()`` lives here, importable without torch or triton: the planner asks it on CPU merges.
"""

import os


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (the kernels run interpreted on the CPU, for tests): launchers
    must not touch the CUDA driver, and the Triton backend needs no GPU. The one place that reads it."""
    return os.environ.get("TRITON_INTERPRET") == "1"
