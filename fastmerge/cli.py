"""Command line: ``fastmerge merge|plan|methods|env|demo`` and the mergekit-style ``fastmerge-yaml``.

mergekit's flags are accepted so that a mergekit command line works by changing the program name:
``mergekit-yaml cfg.yml out --cuda -j 4`` → ``fastmerge-yaml cfg.yml out --cuda -j 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .errors import FastMergeError


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    print(f"fastmerge: warning: {message}", file=sys.stderr)


#: --out-shard-size's help: mergekit's units kept (a bare B is a billion, as in its parse_kmb)
SIZE_HELP = ("bytes, or with a suffix: K/KB = 10^3, M/MB = 10^6, G/GB = 10^9, T/TB = 10^12, KiB/MiB/GiB = 2^10/2^20/2^30; "
             "a bare B means billion, as in mergekit: 5B = 5GB = 5,000,000,000 bytes")
#: mergekit flags that have nothing to do here, and why
MERGEKIT_NOOPS = {
    "--lazy-unpickle": "inputs are always read lazily",
    "--low-cpu-memory": "memory is always bounded (tensor by tensor)",
    "--no-cuda": "the default (--device cpu)",
    "--async-write": "writes are always asynchronous",
    "--clone-tensors": "tensors are never shared between outputs",
    "--safe-serialization": "outputs are always safetensors",
    "--trust-remote-code": "no model code is ever run",
    "--read-to-gpu": "--device cuda reads each tensor group to the GPU itself",
    "--verbose": "there is one level of output",
}


def _version_flag(p: argparse.ArgumentParser) -> None:
    from ._version import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _merge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="merge config: a mergekit-style YAML file")
    p.add_argument("out", help="output folder (written into a temporary folder beside it, renamed into place on success)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where to merge; auto: cuda where a CUDA device is usable, else cpu (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "native", "triton", "cuda"],
                   help="per-tensor kernels; auto: the fastest that can run each tensor (`fastmerge plan --explain` "
                        "says which and why) (default: %(default)s)")
    p.add_argument("--out-shard-size", default="5B", metavar="SIZE", help=f"max size of an output shard: {SIZE_HELP} "
                   "(default: %(default)s)")
    p.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="--device cuda: GPU memory the merge may hold, same units (default: the largest tensor group)")
    p.add_argument("--threads", "-j", "--num-threads", dest="threads", type=int, default=0,
                   help="CPU threads (default: 0 = all cores)")
    p.add_argument("--seed", "--random-seed", dest="seed", type=int, default=None,
                   help="seed of the random methods (dare_*, della*) (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an earlier fastmerge output; refused (naming them) if OUT holds other files")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge of the same plan: keep the shards it completed (checked)")
    p.add_argument("--mergekit-compat", action="store_true", help="reproduce mergekit 0.1.5's native-dtype arithmetic")
    p.add_argument("--allow-crimes", action="store_true",
                   help="merge models whose config.json architectures or model_type differ (refused otherwise, as mergekit)")
    p.add_argument("--no-progress", "--quiet", "-q", dest="progress", action="store_false",
                   help="no progress bar (outside a terminal the progress is a line every few seconds)")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="mergekit's flag: --device cuda")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy the tokenizer files of the base (or first) model to OUT (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy the tokenizer")
    p.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=False,
                   help="write mergekit's model card as OUT/README.md (default: not written)")
    p.add_argument("--no-write-model-card", dest="write_model_card", action="store_false", help="the default")
    g = p.add_argument_group("mergekit flags accepted with nothing to do")
    for flag, why in MERGEKIT_NOOPS.items():
        g.add_argument(flag, *(["-v"] if flag == "--verbose" else []), action="store_true", help=why)
    g.add_argument("--write-threads", type=int, metavar="N", help="writes run on one writer thread per output")


def _options(a: argparse.Namespace) -> dict:
    return dict(
        device=a.device, backend=a.backend, out_shard_size=a.out_shard_size, threads=a.threads, seed=a.seed,
        overwrite=a.overwrite, mergekit_compat=a.mergekit_compat, copy_tokenizer=a.copy_tokenizer, progress=a.progress,
        max_gpu_memory=a.max_gpu_memory, resume=getattr(a, "resume", False), allow_crimes=a.allow_crimes,
        write_model_card=a.write_model_card,
    )


def cmd_merge(a: argparse.Namespace) -> int:
    from .api import merge
    from .io.outdir import stale_temp_dirs

    stale = stale_temp_dirs(Path(a.out))
    if stale and not getattr(a, "resume", False):  # a merge killed (SIGKILL, power cut) before it could clean up
        names = ", ".join(p.name for p in stale)
        print(f"fastmerge: note: earlier merges to {a.out} were killed and left {len(stale)} temporary folder(s) beside "
              f"it: {names}; pass --resume to continue the one of this same plan, or remove them", file=sys.stderr)

    report = merge(a.config, a.out, **_options(a))
    if getattr(report, "rank", 0) == 0:  # under torchrun: one summary (rank 0's, with every rank's totals)
        print(report.summary())
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from .api import plan

    p = plan(a.config, None, device=a.device, backend=a.backend, mergekit_compat=a.mergekit_compat,
             out_shard_size=a.out_shard_size)
    from . import engine

    chosen, skipped_engines = engine.select(p)
    if a.json:
        doc = p.to_json()
        doc["engine"] = {"name": chosen.name, "skipped": skipped_engines}
        if a.world_size:
            from .engine.distributed import partition, shard_weights

            part = partition(shard_weights(p), a.world_size)
            doc["partition"] = {"world_size": a.world_size, "imbalance": part.imbalance, "loads": part.loads,
                                "ranks": [[p.shards[i].filename for i in r] for r in part.ranks]}
        print(json.dumps(doc, indent=1))
        return 0
    from .plan_text import render

    head, body = render(p, chosen.name, skipped_engines, a.explain)
    print("\n".join(head))
    if a.world_size:
        from .engine.distributed import explain as explain_partition

        for line in explain_partition(p, a.world_size):
            print(line)
        if a.world_size > 1 and chosen.name not in ("gpu", "native", "torch"):
            print(f"  note: the {chosen.name} engine runs in one process: it refuses a torchrun job")
    if a.world_size and not a.explain:
        return 0  # the partition alone: a 60k-tensor plan's tensor list is not what was asked for
    print("\n".join(body))
    return 0


def cmd_methods(a: argparse.Namespace) -> int:
    from .methods import list_methods
    from .methods.base import REQUIRED

    rows = []
    for m in list_methods():
        params = [
            {"name": s.name, "scope": "per-model" if s.per_model else "global", "type": s.kind.__name__,
             "default": "required" if s.default is REQUIRED else s.default, "doc": s.doc}
            for s in m.params
        ]
        rows.append({"name": m.name, "base_model": m.base_policy, "paper": m.paper_url, "parameters": params,
                     "doc": (type(m).__module__ and sys.modules[type(m).__module__].__doc__ or "").strip().splitlines()[0]})
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"{r['name']}  (base_model: {r['base_model']})  {r['paper']}\n  {r['doc']}")
        for p in r["parameters"]:
            print(f"    {p['name']:<18} {p['scope']:<9} {p['type']:<5} default={p['default']!s:<9} {p['doc']}")
    return 0


def cmd_env(a: argparse.Namespace) -> int:
    from .env import report

    r = report()
    if a.json:
        print(json.dumps(r, indent=1, default=str))
    else:
        for k, v in r.items():
            print(f"{k:<22} {v}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(cache=Path(a.dir) if a.dir else None, out=Path(a.out) if a.out else None, backend=a.backend,
                    threads=a.threads)


def cmd_lab(a: argparse.Namespace) -> int:
    from .research import lab  # imported here: the lab's experiments load torch, sklearn and matplotlib

    if a.experiment == "list":
        for name, doc in lab.describe():
            print(f"{name:<16} {doc}")
        return 0
    if a.experiment not in lab.EXPERIMENTS:
        print(f"fastmerge lab: unknown experiment '{a.experiment}' (experiments: {', '.join(lab.EXPERIMENTS)})",
              file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else lab_results_dir(a.cache)
    print(f"fastmerge lab: writing under {out}", file=sys.stderr)
    print(lab.run(a.experiment, out, a.cache, a.smoke))
    return 0


def lab_results_dir(cache: str | None) -> Path:
    """``fastmerge lab``'s default output folder: ``results/`` in the checkpoint cache (never the current folder)."""
    from .research.lab.train import default_cache_dir

    return (Path(cache) if cache else default_cache_dir()) / "results"


def cmd_bench(a: argparse.Namespace) -> int:
    from .benchmark.cli import run  # imported here: the benchmark loads torch (mergekit, matplotlib when asked)

    return run(a)


def cmd_lora(a: argparse.Namespace) -> int:
    from .lora.cli import run

    return run(a)


def build_parser(prog: str = "fastmerge") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Fast, streaming, mergekit-compatible model merging.")
    _version_flag(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _merge_flags(sub.add_parser("merge", help="merge checkpoints described by a YAML config"))
    p = sub.add_parser("plan", help="dry run: what would be merged, how, by which backend")
    p.add_argument("config", help="merge config: a mergekit-style YAML file")
    p.add_argument("--json", action="store_true", help="the whole plan as JSON (every tensor's sources, parameters, shard)")
    p.add_argument("--explain", action="store_true", help="also show why other engines and backends were skipped")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="plan for this device, as `merge --device` (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "native", "triton", "cuda"],
                   help="as `merge --backend` (default: %(default)s)")
    p.add_argument("--mergekit-compat", action="store_true", help="as `merge --mergekit-compat`")
    p.add_argument("--out-shard-size", default="5B", metavar="SIZE", help=f"as `merge`: {SIZE_HELP} (default: %(default)s)")
    p.add_argument("--world-size", type=int, default=0,
                   help="show which rank of a torchrun job of this size writes which shard, and the byte balance")
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.add_argument("--json", action="store_true", help="as JSON")
    p = sub.add_parser("env", help="report versions, devices and native extensions")
    p.add_argument("--json", action="store_true", help="as JSON")
    p = sub.add_parser("demo", help="generate a small LLaMA-shaped family, merge it with ties, verify it")
    p.add_argument("--dir", help="where to cache the generated family (default ~/.cache/fastmerge/demo)")
    p.add_argument("--out", help="output folder (default: a folder in the cache)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "native"],
                   help="as `merge --backend` (default: %(default)s)")
    p.add_argument("--threads", "-j", type=int, default=0, help="CPU threads (default: 0 = all cores)")
    p = sub.add_parser("lab", help="merge-quality lab: an experiment on small models trained on sklearn's digits")
    p.add_argument("experiment", help="experiment name, or 'list'")
    p.add_argument("--smoke", action="store_true", help="tiny models, 1-2 epochs: checks the pipeline in seconds")
    p.add_argument("--out", default=None,
                   help="where tables and plots go (default: results/ in the checkpoint cache, never the current folder)")
    p.add_argument("--cache", default=None, help="checkpoint cache (default $FASTMERGE_LAB_CACHE or ~/.cache/fastmerge/lab)")
    from .benchmark.cli import add_parser as add_bench_parser  # argparse only

    add_bench_parser(sub)
    from .lora.cli import add_parsers as add_lora_parsers  # argparse only

    add_lora_parsers(sub)
    return ap


def _run(argv: Sequence[str], prog: str, yaml_mode: bool = False) -> int:
    warnings.showwarning = _one_line_warning
    if yaml_mode:
        ap = argparse.ArgumentParser(prog=prog, description="mergekit-yaml compatible entry point of fastmerge")
        _version_flag(ap)
        _merge_flags(ap)
        a = ap.parse_args(argv)
        handler = cmd_merge
    else:
        a = build_parser(prog).parse_args(argv)
        handler = {"merge": cmd_merge, "plan": cmd_plan, "methods": cmd_methods, "env": cmd_env, "demo": cmd_demo,
                   "lab": cmd_lab, "bench": cmd_bench, "extract-lora": cmd_lora,
                   "merge-adapters": cmd_lora}[a.cmd]
    try:
        return handler(a)
    except FastMergeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP during a merge (engine.signals.Terminated)
        from .engine.signals import received

        signum = getattr(e, "signum", None) or received()
        what = "interrupted" if signum is None else f"terminated by {signal.Signals(signum).name}"
        print(f"{prog}: {what}; nothing was left at the output", file=sys.stderr)
        return 130 if signum is None else 128 + signum
    except BrokenPipeError:  # `fastmerge plan cfg | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    return _run(sys.argv[1:] if argv is None else argv, "fastmerge")


def yaml_main(argv: Sequence[str] | None = None) -> int:
    return _run(sys.argv[1:] if argv is None else argv, "fastmerge-yaml", yaml_mode=True)

