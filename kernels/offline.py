"""Compile the merge kernels for an NVIDIA GPU target on a machine without one: PTX, registers, spills,
and the width of every global load and store (gpu-design.md §1.3, §4: "prepare everything first on a
machine without a GPU").

    python -m fastmerge.kernels.offline [--arch 90] [--json FILE] [VARIANT ...]

prints one row per variant: registers, stack/spill bytes (``ptxas -v`` on the PTX, the ptxas Triton
itself uses), and the PTX loads and stores by width, split into unpredicated ones (a full tile's
path: no mask) and predicated ones (a segment's edge tile: masked). ``tests/kernels/
test_sm90_offline.py`` asserts on these numbers: 16-byte (``v4``) or 8-byte (``v2``) loads and stores on
the full-tile path, exactly one load per input row (the consensus's second loop reuses the first's),
no unpredicated 2-byte (``b16``) access, no spills.

Nothing here talks to a GPU driver: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))``. It needs the real ``@triton.jit`` functions, so it must run without ``TRITON_INTERPRET=1``
(the tests run it in a subprocess). Pointer arguments and the row stride are specialised to 16-byte
divisibility, as the JIT does for 16-byte-aligned tensors and strides that are multiples of 16.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

#: argument name → Triton type of the merge kernels' pointers (anything else ending in _ptr: *i64)
PTR_TYPES = {
    "x_ptr": "*bf16", "base_ptr": "*bf16", "out_ptr": "*i16", "tile_seg_ptr": "*i32", "whole_ptr": "*i8",
    "rank_ptr": "*i32", "w_ptr": "*fp32", "wb_ptr": "*fp32", "scale_ptr": "*fp32", "lam_ptr": "*fp32",
    "div_ptr": "*fp32", "lo_ptr": "*fp32", "hi_ptr": "*fp32", "plo_ptr": "*fp32", "pspan_ptr": "*fp32",
    "nm1_ptr": "*fp32",
    # the selection (select_bracket): int32 keys and bracket bounds, int8 flags
    "klo_ptr": "*i32", "khi_ptr": "*i32", "cand_ptr": "*i32", "samp_ptr": "*i32", "keys_ptr": "*i32", "need_ptr": "*i8",
    "fail_ptr": "*i8", "thr_ptr": "*fp32", "tin_ptr": "*i32",
}
#: integer arguments the JIT specialises to divisibility by 16 when they are (the row strides)
DIV16_INTS = ("sx_t", "srank_t")

_GTA = dict(CONSENSUS=0, NORMALIZE=False, RESCALE=False, TOPK=False, BIG=False, OUT=1)


def _gta(T: int, **kw) -> tuple[str, str, dict]:
    c = dict(_GTA, T=T, MASK=kw.pop("MASK", 1), BLOCK=merge_block_gpu(T))
    c.update(kw)
    return "gta", "_gta_kernel", c


def merge_block_gpu(T: int) -> int:
    """``_common.merge_block`` as on a GPU (the interpreter's blocks differ)."""
    if T <= 4:
        return 2048
    if T <= 20:
        return 1024
    return 512


#: name → (module, kernel, constexprs): the variants the tests check and the GPU script reports
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "ties_T2": _gta(2, MASK=1, CONSENSUS=1, NORMALIZE=True),
    "ties_T8": _gta(8, MASK=1, CONSENSUS=1, NORMALIZE=True),
    "ties_topk_T4": _gta(4, MASK=1, CONSENSUS=1, NORMALIZE=True, TOPK=True),
    "task_arithmetic_T2": _gta(2, MASK=0),
    "task_arithmetic_T8": _gta(8, MASK=0),
    "dare_ties_rescale_T8": _gta(8, MASK=2, CONSENSUS=1, RESCALE=True),
    "breadcrumbs_T4": _gta(4, MASK=1),
    "linear_T2": ("linear", "_linear_kernel", dict(T=2, BASE=0, NORMALIZE=True, OUT=1, BLOCK=2048)),
    "linear_T8": ("linear", "_linear_kernel", dict(T=8, BASE=0, NORMALIZE=True, OUT=1, BLOCK=1024)),
}
#: warps of every variant (``_common.merge_block``)
NUM_WARPS = 8
#: the selection's kernels (``select_bracket``; tests/kernels/test_select_offline.py): the count pass with the
#: merge's tile sizes, and the two kernels of a rank-select round; built by name, not by default
SELECT_VARIANTS: dict[str, tuple[str, str, dict]] = {
    "select_count_T2": ("select_bracket", "_count_kernel", dict(T=2, QPM=1, BLOCK=2048, TILES=False)),
    "select_count_T8": ("select_bracket", "_count_kernel", dict(T=8, QPM=1, BLOCK=1024, TILES=False)),
    "select_count_q2_T4": ("select_bracket", "_count_kernel", dict(T=4, QPM=2, BLOCK=2048, TILES=False)),
    # exact-k TIES: the count pass also records each tile's candidates, then the per-tile tie counts
    "select_tiles_count_T4": ("select_bracket", "_count_kernel", dict(T=4, QPM=1, BLOCK=2048, TILES=True)),
    "select_tiles_count_T8": ("select_bracket", "_count_kernel", dict(T=8, QPM=1, BLOCK=1024, TILES=True)),
    "select_tile_ties_T8": ("select_bracket", "_tile_ties_kernel", dict(T=8, QPM=1, BLOCK=1024)),
    # the radix passes (row chunks, missed brackets): base loaded once per tile for every model
    "select_radix_T2": ("select", "_hist_kernel", dict(T=2, QPM=1, SHIFT=9, BITS=11, FIRST=False, BLOCK=4096)),
    "select_radix_T8": ("select", "_hist_kernel", dict(T=8, QPM=1, SHIFT=9, BITS=11, FIRST=False, BLOCK=4096)),
    "select_radix_first_q2_T4": ("select", "_hist_kernel", dict(T=4, QPM=2, SHIFT=20, BITS=11, FIRST=True, BLOCK=4096)),
    "select_rank_hist": ("select_bracket", "_rank_hist_kernel", dict(TILE=1024, TPP=4)),
    "select_rank_step": ("select_bracket", "_rank_step_kernel", dict(SB=2)),
    "select_sample_T8": ("select_bracket", "_sample_kernel", dict(T=8, CH=128, CPP=1)),
    "select_bracket": ("select_bracket", "_bracket_kernel", dict()),
    "select_verify": ("select_bracket", "_verify_kernel", dict()),
    "select_finish": ("select_bracket", "_finish_kernel", dict()),
}


@dataclasses.dataclass
class Build:
    name: str
    T: int
    block: int
    regs: int
    stack: int
    spill_stores: int
    spill_loads: int
    loads: dict  # "v4.b32" / "b16" / ... → count, unpredicated (full-tile path and scalar table loads)
    masked_loads: dict  # the same, predicated (masked: edge tiles)
    stores: dict
    masked_stores: dict
    seconds: float

    @property
    def elems_per_thread(self) -> int:
        return self.block // (32 * NUM_WARPS)

    @property
    def vector_width(self) -> str:
        """The vector load a full bf16 tile should compile to: 8 per thread → v4.b32 (16 B), 4 → v2.b32."""
        return {8: "v4.b32", 4: "v2.b32", 2: "b32"}.get(self.elems_per_thread, "?")


def _width(instr: str) -> str:
    parts = [p for p in instr.split(".")[2:] if not p.startswith(("L1::", "L2::", "global", "nc", "cache_hint"))]
    return ".".join(parts)


def _count(ptx: str, op: str) -> tuple[dict, dict]:
    plain, masked = collections.Counter(), collections.Counter()
    for pred, instr in re.findall(rf"(@!?%p\d+\s+)?({op}\.global[.\w:]*)", ptx):
        (masked if pred else plain)[_width(instr)] += 1
    return dict(plain), dict(masked)


def ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def ptxas_report(ptx: str, arch: int) -> dict:
    """``ptxas -v`` on ``ptx`` with the ptxas Triton uses for ``arch``: registers, stack, spills."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(arch), "-v", "--gpu-name", target, src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {log[-500:]}")
    num = lambda pat: int(re.search(pat, log).group(1))  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), stack=num(r"(\d+) bytes stack frame"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"))


def compile_variant(name: str, arch: int = 90) -> Build:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.offline needs the compiled @triton.jit kernels: unset TRITON_INTERPRET")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, const = {**VARIANTS, **SELECT_VARIANTS}[name]
    fn = getattr(importlib.import_module(f"fastmerge.kernels.{module}"), kernel)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in const:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = PTR_TYPES.get(a, "*i64")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in DIV16_INTS:
            sig[a] = "i64"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "i32"
    t0 = time.time()
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    loads, masked_loads = _count(ptx, "ld")
    stores, masked_stores = _count(ptx, "st")
    rep = ptxas_report(ptx, arch)
    block = const.get("BLOCK", const.get("TILE", 0))  # the selection's per-query kernels have neither
    return Build(name, const.get("T", 0), block, rep["regs"], rep["stack"], rep["spill_stores"], rep["spill_loads"],
                 loads, masked_loads, stores, masked_stores, round(time.time() - t0, 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help=f"default: all of {', '.join(VARIANTS)}")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", help="write the builds here as JSON")
    a = ap.parse_args(argv)
    builds = [compile_variant(v, a.arch) for v in (a.variants or list(VARIANTS))]
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dataclasses.asdict(b) for b in builds], f, indent=1)
    print(f"| variant (sm_{a.arch}, {NUM_WARPS} warps) | T | BLOCK | regs | stack | spills (st/ld B) "
          "| loads, full-tile path | stores | masked loads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in builds:
        fmt = lambda d: ", ".join(f"{n}×{w}" for w, n in sorted(d.items())) or "–"  # noqa: E731
        print(f"| {b.name} | {b.T} | {b.block} | {b.regs} | {b.stack} | {b.spill_stores}/{b.spill_loads} | "
              f"{fmt(b.loads)} | {fmt(b.stores)} | {fmt(b.masked_loads)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
