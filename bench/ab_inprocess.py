"""A/B of two fastmerge installs on one merge, interleaved: each round runs A then B, each in a fresh
interpreter, and reports MergeReport's in-process time (``wall_s``) and kernel time (``merge_s``).

On the shared 2-core machine one run's page population and writing vary by ±0.2 s, more than many kernel
changes: interleaving puts A and B under the same conditions, and the medians of ≥ 5 rounds compare.

    python bench/ab_inprocess.py --a /path/to/old/venv/bin/python --b python --rounds 6 [--method ties]

Inputs: the benchmark family of bench_end_to_end.py (``bench/out/family-full``; run that benchmark once
with FASTMERGE_BENCH_FULL=1 to generate it), the perf-baselines parameters (weights 0.33, density 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FAMILY = Path(__file__).resolve().parent / "out" / "family-full"


def config(method: str, family: Path) -> dict:
    params = {"weight": 0.33} | ({"density": 0.5} if method not in ("linear", "task_arithmetic") else {})
    return {"merge_method": method, "dtype": "bfloat16", "base_model": str(family / "base"),
            "models": [{"model": str(family / f"ft{i}"), "parameters": params} for i in (1, 2, 3)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="python of install A")
    ap.add_argument("--b", default=sys.executable, help="python of install B (default: this one)")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--family", type=Path, default=FAMILY)
    args = ap.parse_args()
    if not (args.family / "base").is_dir():
        ap.error(f"no benchmark family at {args.family} (FASTMERGE_BENCH_FULL=1 pytest bench/bench_end_to_end.py generates it)")
    with tempfile.TemporaryDirectory() as tmp:
        child = (
            "import fastmerge, json\n"
            f"rep = fastmerge.merge({config(args.method, args.family)!r}, {tmp + '/out'!r}, progress=False, "
            "overwrite=True, copy_tokenizer=False)\n"
            "print(json.dumps({'wall': rep.wall_s, 'merge': rep.merge_s}))\n"
        )
        res: dict[str, list[dict]] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for k, exe in (("A", args.a), ("B", args.b)):
                out = subprocess.run([exe, "-c", child], capture_output=True, text=True, check=True, cwd=tmp).stdout
                res[k].append(json.loads(out.strip().splitlines()[-1]))
    for k, runs in res.items():
        print(f"{k}: in-process {[round(r['wall'], 3) for r in runs]} median {statistics.median(r['wall'] for r in runs):.3f} s"
              f" | kernels median {statistics.median(r['merge'] for r in runs):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
