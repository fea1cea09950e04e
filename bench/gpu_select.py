"""The GPU selection against copy bandwidth, counting ONE read of base + T models (gpu-design.md §3a).

    python bench/gpu_select.py [--out DIR] [--shapes 4096x14336,128256x4096] [--models 2,8] [--density 0.3]

Per (shape, T), bf16, base ~ N(0, 0.02²), models = base + N(0, 0.002²), k = ⌊density·n⌋ for every model:

- ``radix``: the three histogram passes of ``kernels/select.py`` (``tl.histogram``, 11/11/9 bits);
- ``bracket``: ``kernels/select_bracket.py`` called as the TIES kernel calls it (plan, one table copy,
  sample, bracket, count, finish, the radix passes launched for missed queries: call time);
- ``bracket_kernels``: the same launch's kernels alone (tables built once, ``Launch.run``);
- ``count``: its one full read alone (K3), the part that must stream;
- ``count_tiles``: K3 as exact-k TIES runs it (also recording each tile's candidates), ``tile_ties``: the
  per-tile tie counts from those candidates, ``tie_counts_read``: the read of the data they replace.

Bytes counted: (T + 1)·2·n, one read of base and every model, whatever an implementation re-reads;
``% copy`` = that rate over ``copy_`` of a 1 GiB buffer (read + write) measured in the same process.
Every case is checked first: the bracket's values, ranks and equal counts equal the radix select's.
Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each repeat), median of 5 runs each,
reported with the 20/80 % quantiles. The radix select at the largest shape with T = 8 takes ~0.5 s per
call (bench/RESULTS.md): ``--skip-radix-above`` elements·models skips it there.
Appends one JSON line per case to DIR/results.jsonl and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("bench", "out", "gpu"))
    ap.add_argument("--shapes", default="4096x14336,128256x4096")
    ap.add_argument("--models", default="2,8")
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--skip-radix-above", type=float, default=2e9, help="skip the radix select when n·T exceeds this")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test this script (TRITON_INTERPRET=1, tiny shapes)")
    a = ap.parse_args(argv)

    import torch
    import triton
    import triton.testing

    from fastmerge.kernels import select_bracket as sb
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.gta import tie_counts
    from fastmerge.kernels.select import PASSES, Selection, kth_largest

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_select: no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        gpu, sms = props.name, props.multi_processor_count
    else:
        gpu, sms = "cpu (interpreted: a smoke test of this script, not a measurement)", 0
    env = dict(gpu=gpu, sms=sms, torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))

    def bench(fn) -> tuple[float, float, float]:
        """(median, q20, q80) ms over 5 do_bench medians (each: CUDA events, L2 flushed)."""
        if dev.type != "cuda":
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            return ts[1], ts[0], ts[2]
        runs = [triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8]) for _ in range(5)]
        runs.sort(key=lambda r: r[1])
        mid = runs[len(runs) // 2]
        return mid[1], mid[0], mid[2]

    def copy_rate() -> tuple[float, int]:
        buf = torch.empty(1 << 30 if dev.type == "cuda" else 1 << 24, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(buf)
        cp = bench(lambda: dst.copy_(buf))[0]
        return 2 * buf.numel() / cp / 1e6, buf.numel() >> 20

    copy_gbs, copy_mib = copy_rate()
    cp = 2 * (copy_mib << 20) / copy_gbs / 1e6
    print(f"# selection vs copy on {env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, {env['date']} UTC")
    print(f"copy_ {copy_mib} MiB: {cp:.3f} ms = {copy_gbs:.0f} GB/s (read + write)\n")
    print("| n | T | case | ms (q20–q80) | GB/s one read | % copy | fallbacks | candidates / n |")
    print("|---|---|---|---|---|---|---|---|")
    def run_case(shape: str, n: int, T: int) -> int:
        torch.manual_seed(0)
        base = (torch.randn(n, device=dev) * 0.02).bfloat16()
        x = torch.empty((T, n), dtype=torch.bfloat16, device=dev)
        for t in range(T):
            x[t] = (base.float() + 0.002 * torch.randn(n, device=dev)).bfloat16()
        segs = Segments.packed([n])
        k = torch.full((1, T, 1), max(1, int(a.density * n)), dtype=torch.int64)
        g = torch.zeros(1, dtype=torch.int64, device=dev)
        nbytes = (T + 1) * 2 * n

        new = kth_largest(x, base, segs, k)
        fallbacks = int(new.fallbacks.sum())
        inside = new.result.inside.float().mean().item() / n
        cases = {}
        if n * T <= a.skip_radix_above:
            old = kth_largest(x, base, segs, k, passes=PASSES)
            for name in ("values", "k", "eq"):
                if not torch.equal(getattr(new, name), getattr(old, name)):
                    print(f"MISMATCH {shape} T={T} {name}: bracket {getattr(new, name).view(-1)[:4].tolist()} "
                          f"radix {getattr(old, name).view(-1)[:4].tolist()}", file=sys.stderr)
                    return 1
            cases["radix"] = lambda: kth_largest(x, base, segs, k, passes=PASSES)
        cases["bracket"] = lambda: kth_largest(x, base, segs, k)
        sel = Selection.start(k, dev, numel=[n])
        launch = sb.Launch(x, base, segs, g, sel.k.view(-1), sel.plan, sel.tables, 1)
        cases["bracket_kernels"] = launch.run
        lc = launch
        cases["count"] = lambda: sb._count_kernel[(sb.persistent_grid(lc.tiles.count, dev, per_sm=2),)](
            x, x.stride(0), base, g, lc.tiles.seg, lc.tiles.start, lc.start, lc.end, lc.tiles.count,
            lc.need, lc.lo, lc.hi, lc.above, lc.fill, lc.nan, lc.cand, lc.coff, lc.cap, lc.tslot, lc.tin,
            T=T, QPM=1, BLOCK=lc.BLOCK, TILES=False, num_warps=lc.warps,
        )
        # exact-k TIES: the count pass recording each tile's candidates, then the per-tile tie counts taken
        # from them (``tile_ties``), against the read of the data they replace (``gta.tie_counts``)
        sel_t = Selection.start(k, dev, numel=[n], tiles_out=True)
        lt = sb.Launch(x, base, segs, g, sel_t.k.view(-1), sel_t.plan, sel_t.tables, 1, tiles_out=True)
        lt.run()
        thr = new.values.reshape(-1)
        cases["count_tiles"] = lambda: sb._count_kernel[(sb.persistent_grid(lt.tiles.count, dev, per_sm=2),)](
            x, x.stride(0), base, g, lt.tiles.seg, lt.tiles.start, lt.start, lt.end, lt.tiles.count,
            lt.need, lt.lo, lt.hi, lt.above, lt.fill, lt.nan, lt.cand, lt.coff, lt.cap, lt.tslot, lt.tin,
            T=T, QPM=1, BLOCK=lt.BLOCK, TILES=True, num_warps=lt.warps,
        )
        cases["tile_ties"] = lambda: lt.tile_ties(x, base, thr)
        cases["tie_counts_read"] = lambda: tie_counts(x, base, segs, thr.view(1, T), lt.tiles)
        want = tie_counts(x, base, segs, thr.view(1, T), lt.tiles)
        if not torch.equal(lt.tile_ties(x, base, thr), want):
            print(f"MISMATCH {shape} T={T} tile_ties vs tie_counts", file=sys.stderr)
            return 1
        for name, fn in cases.items():
            ms, q20, q80 = bench(fn)
            gbs = nbytes / ms / 1e6
            row = dict(env, case=name, n=n, shape=shape, T=T, density=a.density, ms=ms, q20=q20, q80=q80,
                       bytes_one_read=nbytes, gbs_one_read=gbs, pct_copy=100 * gbs / copy_gbs, copy_gbs=copy_gbs,
                       fallbacks=fallbacks, candidates_frac=inside)
            with open(os.path.join(a.out, "results.jsonl"), "a") as f:
                f.write(json.dumps(dict(row, bench="gpu_select")) + "\n")
            print(f"| {shape} | {T} | {name} | {ms:.3f} ({q20:.3f}–{q80:.3f}) | {gbs:.0f} | {100 * gbs / copy_gbs:.1f} | "
                  f"{fallbacks} | {inside:.4f} |", flush=True)
        return 0

    for shape in a.shapes.split(","):
        r, c = (int(v) for v in shape.split("x"))
        for T in (int(v) for v in a.models.split(",")):
            if run_case(shape, r * c, T):
                return 1
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
