"""The native modules stay importable and callable without torch: the torch-free engine
(``engine.stream.RawIO``) loads fastmerge._native and fastmerge.backends.native and calls the kernels on
raw views, and ``import torch`` alone costs 1.2-1.7 s on the reference machine. Checked in a fresh
interpreter, where nothing else has imported torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastmerge import _native

CHILD = """
import array, sys
import fastmerge._native as n
import fastmerge.backends.native as b
from fastmerge.io.reader import RawView
assert n.HAS_CPU_EXT, n.LOAD_ERRORS
assert callable(b.NativeBackend().run_raw)
for name in ("ties", "dare", "della", "breadcrumbs", "weighted_delta_sum", "sce", "nearswap", "copy"):
    assert callable(getattr(n, name)), name

def view(a):
    ptr, count = a.buffer_info()
    return RawView(ptr, count * a.itemsize, "float32", count)

x, y, out = array.array("f", [1, 2, 3]), array.array("f", [3, 2, 1]), array.array("f", [0, 0, 0])
n.weighted_delta_sum(view(out), [view(x), view(y)], None, [0.5, 0.5], 1.0)
assert list(out) == [2.0, 2.0, 2.0], list(out)
try:
    n.weighted_delta_sum(view(out), [view(array.array("f", [1, 2]))], None, [1.0], None)
except ValueError as e:
    assert "inputs[0]: has 2 elements, expected 3" in str(e), e
else:
    raise AssertionError("a raw view of the wrong size was accepted")
print("TORCH_LOADED=" + str("torch" in sys.modules))
"""


@pytest.mark.skipif(not _native.HAS_CPU_EXT, reason="fastmerge._C not built")
def test_native_modules_import_and_run_without_torch(tmp_path):
    # cwd outside the repository: `python -c` puts the cwd first on sys.path, and the child must import the
    # installed package (with its native extension), not the source tree
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "TORCH_LOADED=False" in r.stdout, r.stdout
