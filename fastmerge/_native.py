"""PLACEHOLDER loader (the native helper replaces this file with the full version)."""
from __future__ import annotations
import importlib
HAS_CPU_EXT = False
HAS_CUDA_EXT = False
LOAD_ERRORS: dict[str, str] = {}
BUILD_INFO: dict = {}
try:
    _C = importlib.import_module("fastmerge._C")
    HAS_CPU_EXT = True
except Exception as e:  # noqa: BLE001
    LOAD_ERRORS["_C"] = f"{type(e).__name__}: {e}"
def cuda_usable():
    return False, "fastmerge._C_cuda not built"
