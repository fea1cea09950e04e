"""Per-tensor timing of the native sparsifying kernels for two fastmerge copies, one side per fresh interpreter,
interleaved (A, B, A, B, ...): ``merge_tensors(method, xs, base, backend="native")`` on 3 bf16 fine-tunes of
one 4096x4096 tensor (base ~ N(0, 1), fine-tune = base + 0.01·N(0, 1)), weight 0.33, density 0.5 (0.9 for
breadcrumbs_ties), each method's defaults otherwise; "ties d=1" is ties at density 1 (the merge pass alone,
no selection) and task_arithmetic the control (no fused block). Medians of --reps calls after one warm-up,
threads 1 and 2.

    python bench/native_pertensor_ab.py --a BASE_SITE --b TEST_SITE --rounds 2 --reps 5

A side is a folder holding a ``fastmerge/`` package with its ``_C`` (e.g. the source tree's fastmerge/ and
kernels/ as fastmerge/kernels, plus a ``_C*.so`` from a separate CMake build), run with this python, the
folder first on sys.path and editable-install finders removed; or ``installed`` for the installed package.
Every child reports the _C it loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = [
    ("task_arithmetic", {"weight": 0.33}),
    ("ties", {"weight": 0.33, "density": 0.5}),
    ("ties d=1", {"weight": 0.33, "density": 1.0}),
    ("dare_ties", {"weight": 0.33, "density": 0.5}),
    ("breadcrumbs_ties", {"weight": 0.33, "density": 0.9}),
    ("della", {"weight": 0.33, "density": 0.5}),
]

CHILD = r"""
import json, statistics, sys, time
side, reps, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
if side != "installed":
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, side)
import torch
import fastmerge._C as C
from fastmerge import merge_tensors
assert side == "installed" or C.__file__.startswith(side), C.__file__
torch.manual_seed(0)
b = torch.randn(4096, 4096).bfloat16()
xs = [b + 0.01 * torch.randn(4096, 4096).bfloat16() for _ in range(3)]
res = {"_C": C.__file__}
for name, kw in cases:
    m = name.split()[0]
    for th in (1, 2):
        merge_tensors(m, xs, b, threads=th, backend="native", **kw)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            merge_tensors(m, xs, b, threads=th, backend="native", **kw)
            ts.append(time.perf_counter() - t0)
        res[f"{name} t{th}"] = 1000 * statistics.median(ts)
print(json.dumps(res))
"""


def run(side: str, reps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, side, str(reps), json.dumps(CASES)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    got: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(args.rounds):
        for key in ("a", "b"):
            r = run(getattr(args, key), args.reps)
            got[key].append(r)
            print(f"{key}: {r.pop('_C')}", flush=True)
    print("| case | threads | A (ms, median per round) | B (ms, median per round) | A / B |")
    print("|---|---|---|---|---|")
    for name, _ in CASES:
        for th in (1, 2):
            k = f"{name} t{th}"
            a = [r[k] for r in got["a"]]
            b = [r[k] for r in got["b"]]
            print(f"| {name} | {th} | {' / '.join(f'{v:.1f}' for v in a)} | {' / '.join(f'{v:.1f}' for v in b)} | "
                  f"{statistics.median(a) / statistics.median(b):.1f}x |")


if __name__ == "__main__":
    main()
