"""Backend selection: every backend answers ``not_supported_reasons``; the first with none wins.

Priority on CPU: native (C++) > torch. On CUDA: cuda > triton > torch. ``FASTMERGE_BACKEND`` or
``--backend`` forces one; a forced backend that cannot run a tensor is an error listing its reasons
(never a silent fallback). ``explain`` returns every backend's reasons, shown by ``fastmerge plan``.
"""

from __future__ import annotations

import os

from .._lazy import torch

from ..errors import BackendUnavailableError
from .base import Backend, MergeJob
from . import cuda
from .cuda import CudaBackend
from .native import NativeBackend
from .torch_ref import TorchBackend
from .triton import TritonBackend

BACKENDS: dict[str, Backend] = {
    "cuda": CudaBackend(),
    "triton": TritonBackend(),
    "native": NativeBackend(),
    "torch": TorchBackend(),
}
PRIORITY = {"cpu": ("native", "torch"), "cuda": ("cuda", "triton", "torch")}
CHOICES = ("auto", *BACKENDS)


def explain(job: MergeJob, device: str) -> dict[str, list[str]]:
    """Every backend's reasons for not running ``job`` on ``device`` (empty list: it can)."""
    return {name: b.not_supported_reasons(job, device) for name, b in BACKENDS.items()}


def select(job: MergeJob, device: str, prefer: str = "auto") -> tuple[str, dict[str, list[str]]]:
    """(backend name, reasons of the others) for one tensor."""
    prefer = os.environ.get("FASTMERGE_BACKEND", prefer) if prefer == "auto" else prefer
    reasons = explain(job, device)
    if prefer != "auto":
        if prefer not in BACKENDS:
            raise BackendUnavailableError(f"--backend: unknown backend '{prefer}' (choose from {', '.join(CHOICES)})")
        if reasons[prefer]:
            raise BackendUnavailableError(
                f"tensor '{job.tensor}': backend '{prefer}' cannot run it: {'; '.join(reasons[prefer])}"
            )
        return prefer, {k: v for k, v in reasons.items() if k != prefer}
    for name in PRIORITY[device]:
        if not reasons[name]:
            if name == "cuda" and job.numel is not None and job.numel < cuda.MIN_ELEMS and not reasons["triton"]:
                # what gpu_runner does with such a tensor: the plan shows where it really runs
                reasons["cuda"] = [f"under {cuda.MIN_ELEMS} elements: batched on Triton (--backend cuda forces it)"]
                name = "triton"
            return name, {k: v for k, v in reasons.items() if k != name}
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in reasons.items())
    raise BackendUnavailableError(f"tensor '{job.tensor}': no backend can run it on {device} ({detail})")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"--device: unknown device '{device}' (auto, cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda: torch sees no usable CUDA device")
    return device


__all__ = ["BACKENDS", "CHOICES", "Backend", "MergeJob", "explain", "select", "resolve_device"]
