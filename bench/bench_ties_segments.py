"""TIES on many small segments against one TIES call on the same elements, per element, for two builds of
``fastmerge._C`` side by side: ``_C.ties_segments`` over S segments of L bf16 elements (2 models + base,
density 0.5, base ~ N(0, 1), fine-tune = base + 0.01·N(0, 1)) and ``_C.ties`` on the S·L elements as one
tensor, threads 1 and 2, exact_k off and on (--density 1: the merge pass alone). Each side runs in a fresh
interpreter, interleaved (A, B, A, B, ...); a figure is the median of --reps calls after one warm-up, in ns per
element.

    python bench/bench_ties_segments.py --a OLD_C_SO --b installed --rounds 2 --reps 7

A side is the path of a ``_C*.so`` (e.g. from a separate build of an older tree) or ``installed``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import importlib.machinery, importlib.util, json, statistics, sys, time
side, reps, seg, nseg, dens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
if side == "installed":
    import fastmerge._C as C
else:
    loader = importlib.machinery.ExtensionFileLoader("fastmerge._C", side)
    C = importlib.util.module_from_spec(importlib.util.spec_from_file_location("fastmerge._C", side, loader=loader))
    loader.exec_module(C)
import torch
BF16 = 2
n = seg * nseg
g = torch.Generator().manual_seed(0)
b = torch.randn(n, generator=g).bfloat16()
xs = [(b.float() + 0.01 * torch.randn(n, generator=g)).bfloat16() for _ in range(2)]
out = torch.empty(n, dtype=torch.bfloat16)
offs = list(range(0, n + 1, seg))
common = ([x.data_ptr() for x in xs], [BF16, BF16], b.data_ptr(), BF16, [0.5, 0.5], [dens, dens], True, 1.0, 0)

def segs(th, ek):
    C.ties_segments(out.data_ptr(), BF16, offs, *common, ek, th, False)

def one(th, ek):
    C.ties(out.data_ptr(), BF16, n, *common, ek, th, False)

res = {"_C": C.__file__}
for ek in (False, True):
    for th in (1, 2):
        for name, f in (("segments", segs), ("one call", one)):
            f(th, ek)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                f(th, ek)
                ts.append(time.perf_counter() - t0)
            res[f"{name}|{th}|{ek}"] = 1e9 * statistics.median(ts) / n
print(json.dumps(res))
"""


def run(side: str, reps: int, seg: int, nseg: int, density: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, side, str(reps), str(seg), str(nseg), str(density)], check=True,
                         capture_output=True, text=True, cwd="/").stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", default="installed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seg", type=int, default=2048, help="elements per segment")
    ap.add_argument("--nseg", type=int, default=2560, help="segments")
    ap.add_argument("--density", type=float, default=0.5, help="1 = no selection: the merge pass alone")
    args = ap.parse_args()
    got: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(args.rounds):
        for key in ("a", "b"):
            r = run(getattr(args, key), args.reps, args.seg, args.nseg, args.density)
            got[key].append(r)
            print(f"{key}: {r.pop('_C')}", flush=True)
    print(f"{args.nseg} segments of {args.seg} bf16 elements, 2 models + base, density {args.density}; ns per element, "
          "median of each round")
    print("| call | threads | exact_k | A | B | A / B |")
    print("|---|---|---|---|---|---|")
    for k in got["a"][0]:
        name, th, ek = k.split("|")
        a = [r[k] for r in got["a"]]
        b = [r[k] for r in got["b"]]
        print(f"| {name} | {th} | {ek} | {' / '.join(f'{v:.2f}' for v in a)} | {' / '.join(f'{v:.2f}' for v in b)} | "
              f"{statistics.median(a) / statistics.median(b):.2f}x |")
    print("\nsegments / one call (medians of the rounds' medians)")
    print("| threads | exact_k | A | B |")
    print("|---|---|---|---|")
    for k in got["a"][0]:
        name, th, ek = k.split("|")
        if name != "segments":
            continue
        one = f"one call|{th}|{ek}"
        ratio = {side: statistics.median(r[k] for r in got[side]) / statistics.median(r[one] for r in got[side])
                 for side in ("a", "b")}
        print(f"| {th} | {ek} | {ratio['a']:.2f}x | {ratio['b']:.2f}x |")


if __name__ == "__main__":
    main()
