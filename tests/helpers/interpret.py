"""Triton's interpreter on machines without a CUDA device: TRITON_INTERPRET must be set before anything imports
a triton kernel (a kernel decorated before it is set cannot call another one under the interpreter: "Cannot
call @triton.jit'd outside of the scope of a kernel"). Both conftests (tests/, bench/) call this first."""

import os


def interpret_without_gpu() -> None:
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        cuda = False
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
