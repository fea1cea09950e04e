"""``fastmerge env``: what is installed, what was built, what is usable, and why not."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import Any


def _v(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def report() -> dict[str, Any]:
    import torch

    from . import _native
    from ._version import __version__

    ok, why = _native.cuda_usable()
    r: dict[str, Any] = {
        "fastmerge": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.cuda.is_available(),
        "safetensors": _v("safetensors"),
        "triton": _v("triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "FASTMERGE_BACKEND": os.environ.get("FASTMERGE_BACKEND", ""),
        "native_cpu (_C)": _native.HAS_CPU_EXT,
        "native_cuda (_C_cuda)": _native.HAS_CUDA_EXT,
        "cuda_usable": ok if ok else f"no: {why}",
        # what _native gave libgomp while loading _C; not set: the user chose, or no _C was loaded
        "omp_spincount": _native.OMP_SPINCOUNT or (
            "not set by fastmerge: a libgomp was loaded before it (torch imported first?) and keeps its own; set "
            "GOMP_SPINCOUNT=2000 before starting Python" if _native.LIBGOMP_PRELOADED else f"not set by fastmerge ({_omp_env()})"),
    }
    r.update({f"build.{k}": v for k, v in (_native.BUILD_INFO or {}).items()})
    r.update({f"load_error.{k}": v for k, v in _native.LOAD_ERRORS.items()})
    return r


def _omp_env() -> str:
    return ", ".join(f"{k}={os.environ[k]}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ) or "unset"
