"""A/B of two fastmerge installs on one merge, interleaved: each round runs A then B, each in a fresh
interpreter, and reports MergeReport's in-process time (``wall_s``) and kernel time (``merge_s``).

On the shared 2-core machine one run's page population and writing vary by ±0.2 s, more than many kernel
changes: interleaving puts A and B under the same conditions, and the medians of ≥ 5 rounds compare.

    python bench/ab_inprocess.py --a /path/to/old/venv/bin/python --b python --rounds 6 [--method ties]
    python bench/ab_inprocess.py --a OLD_SITE --b NEW_SITE --rounds 11   # pip install --target dirs

Each side names a python executable or a ``pip install --target`` directory (run with this python, the
directory first on sys.path and editable-install finders removed). Check what each side imports: an
editable install in the system site-packages wins over a ``--system-site-packages`` venv's own copy (its
finder sits on sys.meta_path), so such a venv silently runs the editable tree. Every child reports the
fastmerge and _C it loaded, and two sides that load the same files are refused.

Inputs: the benchmark family of bench_end_to_end.py (``bench/out/family-full``; run that benchmark once
with FASTMERGE_BENCH_FULL=1 to generate it), the benchmark's parameters (weights 0.33, density 0.5).
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
    doc = {"merge_method": method, "dtype": "bfloat16",
           "models": [{"model": str(family / f"ft{i}"), "parameters": params} for i in (1, 2, 3)]}
    if method != "linear":  # linear merges the 3 fine-tunes (a base would be a 4th input that needs a weight)
        doc["base_model"] = str(family / "base")
    return doc


def command(side: str, child: str) -> list[str]:
    """argv that runs ``child`` with side A's or B's fastmerge (a python executable, or a --target dir)."""
    if not Path(side).is_dir():
        return [side, "-c", child]
    prologue = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(Path(side).resolve())!r})\n"
    )
    return [sys.executable, "-c", prologue + child]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="python of install A, or its pip install --target directory")
    ap.add_argument("--b", default=sys.executable, help="the same for install B (default: this python)")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--family", type=Path, default=FAMILY)
    args = ap.parse_args()
    if not (args.family / "base").is_dir():
        ap.error(f"no benchmark family at {args.family} (FASTMERGE_BENCH_FULL=1 pytest bench/bench_end_to_end.py generates it)")
    with tempfile.TemporaryDirectory() as tmp:
        child = (
            "import fastmerge, json\n"
            "from fastmerge import _native\n"
            f"rep = fastmerge.merge({config(args.method, args.family)!r}, {tmp + '/out'!r}, progress=False, "
            "overwrite=True, copy_tokenizer=False)\n"
            "print(json.dumps({'wall': rep.wall_s, 'merge': rep.merge_s, 'loaded': [fastmerge.__file__, "
            "_native._cpu_ext().__file__]}))\n"
        )
        res: dict[str, list[dict]] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for k, side in (("A", args.a), ("B", args.b)):
                out = subprocess.run(command(side, child), capture_output=True, text=True, check=True, cwd=tmp).stdout
                res[k].append(json.loads(out.strip().splitlines()[-1]))
            if res["A"][-1]["loaded"] == res["B"][-1]["loaded"]:
                ap.error(f"A and B load the same install ({res['A'][-1]['loaded']}): nothing to compare")
    for k, runs in res.items():
        print(f"{k}: {runs[0]['loaded'][1]}")
        print(f"{k}: in-process {[round(r['wall'], 3) for r in runs]} median {statistics.median(r['wall'] for r in runs):.3f} s"
              f" | kernels median {statistics.median(r['merge'] for r in runs):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
