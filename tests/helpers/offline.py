"""Triton kernels compiled for sm_90 without a GPU (``fastmerge.kernels.offline``), for the offline tests in
tests/kernels: whether triton's NVIDIA backend (its bundled ptxas) is here, and one build of the named variants.

The compile runs in a subprocess: the test session sets ``TRITON_INTERPRET=1``, which replaces ``@triton.jit``
kernels by interpreted ones."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any, Sequence


def ptxas_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from fastmerge.kernels.offline import ptxas_path

        return os.path.exists(ptxas_path(90))
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton
        return False


def offline_builds(tmp_path_factory: Any, name: str, variants: Sequence[str] = ()) -> dict[str, dict]:
    """{variant: its build report} for ``variants`` (offline's default set when empty)."""
    out = tmp_path_factory.mktemp(name) / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    # cwd outside the repository: `python -m` puts the cwd first on sys.path, and the source tree's
    # fastmerge has no fastmerge.kernels (the wheel maps kernels/ there)
    r = subprocess.run([sys.executable, "-m", "fastmerge.kernels.offline", "--json", str(out), *variants], env=env,
                       capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    return {b["name"]: b for b in json.loads(out.read_text())}
