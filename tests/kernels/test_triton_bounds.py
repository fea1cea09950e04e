"""Integer widths and bounds of the kernel launchers (gpu-design.md §5.7).

- ``sphere._gram_kernel``'s partial-sum offset p·R² + i·R + j passes 2^31 at ~2.2 M tiles when R = 31
  (a 128256×4096 embedding stacked 9 times is 4.7 G elements = 2.3 M tiles of 2048). It used the int32
  program id. Allocating that buffer is out of reach here, so the tests check the arithmetic itself:
  the offset function the kernel calls (``sphere.part_offset``), run by a one-program stand-in kernel
  on int32 and int64 tile ids (int32 wraps: the old kernel's bug; int64 is exact), and the compiled
  kernel (its TTIR, built offline for sm_90) multiplies a sign-extended i64 program id. What this does
  not prove: that a real 4.7 G-element launch on a GPU writes the right cells (the GPU lane's
  ``test_triton_gpu.py`` int64 test covers element offsets past 2^31, not the Gram's).
- ``linear.combine``, ``select.kth_largest`` and ``Selection.histogram`` check the segments against
  their buffers (``gta_merge`` already did): an out-of-range segment is a clear ValueError, never an
  out-of-bounds read or write.
"""

import os
import subprocess
import tempfile
import sys

import pytest
import torch
import triton
import triton.language as tl

from fastmerge.kernels._common import Segments
from fastmerge.kernels.sphere import part_offset
from helpers.kernel_cases import needs_triton

pytestmark = needs_triton


@triton.jit
def _probe(out_ptr, p_arg, R, I64: tl.constexpr):
    if I64:
        p = p_arg.to(tl.int64)
    else:
        p = p_arg.to(tl.int32)
    tl.store(out_ptr, part_offset(p, R, R - 1, R - 1).to(tl.int64))


def _run_probe(p: int, R: int, i64: bool) -> int:
    out = torch.zeros(1, dtype=torch.int64)
    _probe[(1,)](out, p, R, I64=i64)
    return int(out[0])


def test_gram_offset_past_2_31_needs_int64_tile_ids():
    P, R = 2_300_000, 31  # tiles of a 4.7 G-element stacked tensor at BLOCK 2048, R = T + 1 = 31
    want = P * R * R + (R - 1) * R + (R - 1)
    assert want > 2**31
    assert _run_probe(P, R, True) == want
    assert _run_probe(P, R, False) == (want + 2**31) % 2**32 - 2**31  # what the int32 program id computed: wrapped


@pytest.mark.skipif(os.environ.get("FASTMERGE_SKIP_OFFLINE") == "1", reason="offline compile disabled")
def test_compiled_gram_kernel_uses_an_int64_tile_id():
    """The kernel as compiled for sm_90 (no GPU): the program id is sign-extended to i64 before the
    offset's multiply (TTIR: ``arith.extsi %pid : i32 to i64``)."""
    code = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmerge.kernels.sphere import _gram_kernel as fn
const = dict(BASE=1, F64=False, BLOCK=2048)
sig = {a: ("constexpr" if a in const else "*bf16" if a in ("x_ptr", "base_ptr") else "*fp64" if a == "part_ptr"
           else "*i32" if a == "tile_seg_ptr" else "*i64" if a.endswith("_ptr") else "i64" if a == "sx_t" else "i32")
       for a in fn.arg_names}
k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print(k.asm["ttir"])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=tempfile.gettempdir())  # not the repository: its source tree would shadow the install
    if r.returncode and "ptxas" in r.stderr:
        pytest.skip("no NVIDIA backend")
    assert r.returncode == 0, r.stderr[-2000:]
    ttir = r.stdout
    pid = [ln for ln in ttir.splitlines() if "tt.get_program_id x" in ln]
    assert pid, ttir[:2000]
    name = pid[0].split("=")[0].strip()
    assert any(f"arith.extsi {name} : i32 to i64" in ln for ln in ttir.splitlines()), "program id not widened to i64"


def _rows(T=2, n=100):
    return torch.randn(T, n), torch.randn(n)


def test_combine_checks_segments_against_rows_base_and_out():
    from fastmerge.kernels.linear import combine

    x, base = _rows()
    w = torch.ones(1, 2)
    with pytest.raises(ValueError, match="segments reach"):
        combine(x, None, torch.empty(100), Segments((50,), (60,), (0,)), w)  # past the rows
    with pytest.raises(ValueError, match="segments reach"):
        combine(x, None, torch.empty(80), Segments.packed([90]), w)  # past the output
    with pytest.raises(ValueError, match="segments reach"):
        combine(x, base[:70], torch.empty(100), Segments.packed([90]), w, base_mode=3)  # past the base
    with pytest.raises(ValueError, match="weight"):
        combine(x, None, torch.empty(100), Segments.packed([90]), torch.ones(2, 2))


def test_selection_checks_segments_and_shapes():
    from fastmerge.kernels.select import Selection, kth_largest

    x, base = _rows()
    k = torch.ones((1, 2, 1), dtype=torch.int64)
    with pytest.raises(ValueError, match="segments reach"):
        kth_largest(x, base, Segments((40,), (61,), (0,)), k)
    with pytest.raises(ValueError, match="segments reach"):
        kth_largest(x, base[:50], Segments.packed([60]), k)
    with pytest.raises(ValueError, match=r"k must be \[S, T, Q\]"):
        kth_largest(x, base, Segments.packed([60, 20]), k)  # one k row for two segments
    sel = Selection.start(k, "cpu")
    with pytest.raises(ValueError, match="group indices"):
        sel.histogram(0, x, base, Segments.packed([60, 20]), groups=[0])


def test_gram_checks_segments():
    from fastmerge.kernels.sphere import gram

    x, base = _rows()
    with pytest.raises(ValueError, match="segments reach"):
        gram(x, base[:10], Segments.packed([50]), base_mode=1)
