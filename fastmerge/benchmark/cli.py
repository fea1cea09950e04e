"""The ``fastmerge bench`` subcommand: its arguments and its handler (imports nothing heavy until run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KERNELS_EPILOG = """\
GB/s counts physical-minimum bytes: the bytes the method must move (e.g. TIES reads every input twice,
once to select and once to merge, and writes the output once); % of copy compares that with a copy
(memcpy / device-to-device) measured in the same run. Shapes: presets llama-8b, llama-70b, quick, or
ROWSxCOLS. The JSON schema is documented in docs/benchmark.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the merge kernels, a whole merge, or compare two runs, on this machine")
    bs = p.add_subparsers(dest="bench_cmd", required=True)
    k = bs.add_parser("kernels", help="time each merge kernel: GB/s, %% of copy, speed-up over torch and mergekit",
                      epilog=KERNELS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    k.add_argument("--methods", help="comma-separated (default: every method with a fused kernel on the device)")
    k.add_argument("--backends", help="comma-separated: native, torch, triton, cuda, mergekit "
                                      "(default: the device's backends, and mergekit when installed)")
    k.add_argument("--shapes", help="comma-separated presets (llama-8b, llama-70b, quick) or ROWSxCOLS (default llama-8b)")
    k.add_argument("--models", help="comma-separated numbers of fine-tunes T besides the base (default: 3 on cpu, 2,4,8 on cuda)")
    k.add_argument("--dtype", help="comma-separated: bf16, fp16, fp32 (default bf16)")
    k.add_argument("--repeats", type=int, help="timed calls per case (default 10; 3 with --quick)")
    k.add_argument("--max-seconds", type=float, help="stop repeating a case after this much timed work (default 5; 0.5 with --quick)")
    k.add_argument("--threads", "-j", type=int, default=0, help="native kernel threads (0: OpenMP's default)")
    k.add_argument("--json", metavar="FILE", help="write the results as JSON (schema_version, machine, every timing)")
    k.add_argument("--plot", metavar="FILE.png", help="write a roofline chart (needs matplotlib)")
    k.add_argument("--quick", action="store_true", help="small shapes, T=2, few methods and repeats: well under a minute")
    k.add_argument("--no-progress", action="store_true")
    m = bs.add_parser("merge", help="time a whole merge N times against the read-once/write-once floor")
    m.add_argument("config")
    m.add_argument("--repeat", type=int, default=3, help="runs of the merge and of the floor (default 3)")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.add_argument("--backend", default="auto", choices=["auto", "torch", "native", "triton", "cuda"])
    m.add_argument("--threads", "-j", type=int, default=0)
    m.add_argument("--workdir", help="where the outputs are written, then deleted (default: the current folder)")
    m.add_argument("--json", metavar="FILE")
    m.add_argument("--no-progress", action="store_true")
    c = bs.add_parser("compare", help="ratios between two --json runs; exit 1 on a regression beyond the measured spread")
    c.add_argument("a", metavar="A.json", help="the reference run (before)")
    c.add_argument("b", metavar="B.json", help="the run to judge (after)")
    c.add_argument("--min-tolerance", type=float, default=None, help="smallest noise band (default 0.05: 5 %%)")
    c.add_argument("--json", metavar="FILE", help="write the comparison as JSON")


def _write_json(doc: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}", file=sys.stderr)


def run(a: argparse.Namespace) -> int:
    from . import report

    try:
        if a.bench_cmd == "kernels":
            from . import kernels

            s = kernels.resolve(a.device, a.methods, a.backends, a.shapes, a.models, a.dtype, a.quick, a.repeats,
                                a.threads, a.max_seconds)
            doc = kernels.run(s, progress=not a.no_progress)
        elif a.bench_cmd == "merge":
            from . import merge

            if a.repeat < 1:
                raise ValueError("--repeat must be >= 1")
            doc = merge.run(a.config, a.repeat, a.workdir, a.device, a.threads, a.backend, progress=not a.no_progress)
        else:
            from . import compare

            text, regressed, cdoc = compare.run(a.a, a.b, a.json, compare.MIN_TOLERANCE if a.min_tolerance is None else a.min_tolerance)
            print(text)
            return 1 if regressed else 0
    except (ValueError, OSError) as e:
        print(f"fastmerge bench: error: {e}", file=sys.stderr)
        return 2
    errs = report.validate(doc)
    if errs:  # a bug here, not the user's: say so rather than write a document CI would reject later
        print("fastmerge bench: internal error: the document breaks its schema: " + "; ".join(errs[:5]), file=sys.stderr)
        return 3
    print(report.table(doc))
    if getattr(a, "json", None):
        _write_json(doc, a.json)
    if getattr(a, "plot", None):
        try:
            print(f"wrote {report.plot(doc, a.plot)}", file=sys.stderr)
        except RuntimeError as e:
            print(f"fastmerge bench: {e}", file=sys.stderr)
            return 2
    return 0
