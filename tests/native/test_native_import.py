"""The native modules stay importable without torch: the torch-free fast path (fastmerge.fastpath) loads
fastmerge._native and fastmerge.backends.native, and ``import torch`` alone costs 1.2-1.7 s on the
reference machine. Checked in a fresh interpreter, where nothing else has imported torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastmerge import _native

CHILD = """
import sys
import fastmerge._native as n
import fastmerge.backends.native as b
assert n.HAS_CPU_EXT, n.LOAD_ERRORS
assert callable(b.NativeBackend().run_raw)
for name in ("ties_raw", "dare_raw", "della_raw", "breadcrumbs_raw", "weighted_delta_sum_raw"):
    assert callable(getattr(n, name)), name
print("TORCH_LOADED=" + str("torch" in sys.modules))
"""


@pytest.mark.skipif(not _native.HAS_CPU_EXT, reason="fastmerge._C not built")
def test_native_modules_import_without_torch(tmp_path):
    # cwd outside the repository: `python -c` puts the cwd first on sys.path, and the child must import the
    # installed package (with its native extension), not the source tree
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "TORCH_LOADED=False" in r.stdout, r.stdout
