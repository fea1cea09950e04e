"""Per-tensor overhead: merge throughput on a MoE family of >= 20k small tensors vs a family of large tensors.

    python bench/bench_moe.py [--root DIR] [--repeat 3] [--mergekit] [--fp8] [--families moe-fp8,...]

Families (``fastmerge.testing``, generated once under ``--root``; base + 2 fine-tunes, bf16):

- ``moe-small``: DeepSeek-V3-shaped with its real expert count (256 routed + 1 shared per MoE layer) and
  tiny dimensions (hidden 64, experts of 32): 27 layers, 20,347 tensors per model of 4 KB each.
- ``moe-16k``, ``moe-64k``: the same 20,347 tensors per model with experts of 16 KB and 64 KB (hidden 128 and 256):
  where per-tensor costs stop dominating (1.0 GB and 4.0 GB of input).
- ``dense-large``: LLaMA-shaped, hidden 1024, 4 layers: 39 tensors per model of 0.5-32 MB (505 MB of input).
- ``dense-bench``: the shape of bench_end_to_end.py's benchmark family (hidden 1024, 8 layers, vocab 32000;
  75 tensors per model of 2-66 MB): 1.0 GB of input, as moe-16k (a large output pays more of the disk's writeback,
  so families of equal bytes compare per tensor only).
- ``moe-real``: Qwen3-30B-A3B's real dimensions (hidden 2048, 128 experts of 2048x768), 1 layer, vocab 8192:
  396 tensors per model, the 384 experts of 3 MB each (what per-tensor overhead costs at a real expert size;
  3.9 GB of input, so only when named in ``--families``).
- ``--fp8``: ``moe-small`` in DeepSeek-V3's FP8 layout (hidden 256, experts of 128: whole 128x128 blocks): the
  native engine's kernels read the FP8 bytes and scales (csrc/cpu/fp8.h), the torch engine dequantises each
  input tensor into fp32 in torch first (io.fp8.dequantize).
- ``--families``: run only these (comma-separated names of the above).
- ``--ab``: instead, on ``moe-small`` only, each merge with the engine's runs of small tensors
  (``engine.stream.batches``) and tensor by tensor (``stream.SMALL_NUMEL = 0``), interleaved, same plan.
- ``--planning``: instead, the steps before a merge's first byte on the families of small tensors (and
  ``moe-fp8``) named in ``--families``, no I/O: ``build_plan``, the engine's choice, the digest, the engine's runs (medians of 7 plans in a
  child process, ``--repeat`` children); with ``--against DIR``, the install in DIR and this tree alternating.
- ``--against DIR``: instead, this tree against the fastmerge installed in ``DIR`` (``pip install --target DIR
  <old checkout>``: its own ``_C``) on dense-large and the first family of small tensors named in ``--families``
  (moe-small by default), each merge a child process timing ``fastmerge.merge`` (planning included), the
  installs alternated in each round; ``--warm N``: each child
  merges N + 1 times and keeps the last N (in-process, warm: the merges' own differences, without a fresh
  process's first-call costs).

Prints GB/s of input (bytes read / wall time of ``fastmerge.merge`` in this process, planning included) for
ties and linear on the ``native`` engine (torch-free) and the ``torch`` engine (``FASTMERGE_FASTPATH=0``),
the merge loop's own time (``MergeReport.wall_s``: from the plan's digest to the commit: reading, kernels,
writing; its ``gbps`` is the "GB/s of input" a merge's summary prints), the ratio of the large-tensor family's
throughput to the small one's, in wall time and in the report's GB/s (the families alternate within each of the
``--repeat`` rounds; the median of the rounds' ratios), the time of ``fastmerge plan``'s work in-process (``build_plan``,
then the plan's ``digest``) and, with ``--mergekit``, mergekit 0.1.5's wall time on the same configs
(``mergekit-yaml``, a child process). Times are medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import fastmerge
from fastmerge.testing import DeepSeekV3Shape, LlamaShape, Qwen3MoeShape, make_family

SMALL = DeepSeekV3Shape(hidden=64, layers=27, first_k_dense=1, intermediate=96, moe_intermediate=32, experts=256,
                        heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope=16, qk_rope=8, v_head=16, vocab=512)
FP8 = DeepSeekV3Shape(hidden=256, layers=4, first_k_dense=1, intermediate=384, moe_intermediate=128, experts=256,
                      heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope=64, qk_rope=64, v_head=64, vocab=1024)
#: moe-small's 20k tensors at 4x and 16x its bytes (experts of 16 KB and 64 KB): where per-tensor costs stop dominating
MID16 = DeepSeekV3Shape(hidden=128, layers=27, first_k_dense=1, intermediate=192, moe_intermediate=64, experts=256,
                        heads=2, q_lora_rank=64, kv_lora_rank=64, qk_nope=32, qk_rope=16, v_head=32, vocab=1024)
MID64 = DeepSeekV3Shape(hidden=256, layers=27, first_k_dense=1, intermediate=384, moe_intermediate=128, experts=256,
                        heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope=64, qk_rope=64, v_head=64, vocab=2048)
LARGE = LlamaShape(hidden=1024, layers=4, intermediate=2816, vocab=16000, heads=8)
BENCH = LlamaShape(hidden=1024, layers=8, intermediate=2816, vocab=32000, heads=16)
#: Qwen3-30B-A3B's real dimensions (hidden 2048, 128 experts of 768: 3 MB bf16 tensors), 1 of its 48 layers
REAL = Qwen3MoeShape(layers=1, vocab=8192)
#: the families of small tensors, by name
SHAPES = {"moe-small": SMALL, "moe-16k": MID16, "moe-64k": MID64}


def family(root: Path, name: str, shape, fp8: bool = False) -> tuple[Path, list[Path]]:
    d = root / name
    if not (d / "ft2" / "config.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        make_family(d, shape, n_finetunes=2, shard_bytes=2_000_000_000, fp8_block=(128, 128) if fp8 else None)
    return d / "base", [d / "ft1", d / "ft2"]


def config(method: str, base: Path, fts: list[Path]) -> dict:
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1 / 3}} for p in [base, *fts]],
                "dtype": "bfloat16"}
    return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in fts]}


def run_fastmerge(cfg: dict, engine: str, repeat: int) -> tuple[float, float, float, int, str]:
    """(median wall of fastmerge.merge, median of its merge loop's wall, median CPU time of the process
    during the merge (all threads: on a shared machine the wall time is mostly waiting for a core), bytes
    read, engine used)."""
    os.environ["FASTMERGE_FASTPATH"] = "1" if engine == "native" else "0"
    times, loops, cpus, nbytes, used = [], [], [], 0, ""
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            r = fastmerge.merge(cfg, Path(tmp) / "out", threads=2, progress=False)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            loops.append(r.wall_s)
            nbytes, used = r.bytes_read, r.engine
    os.environ.pop("FASTMERGE_FASTPATH", None)
    return statistics.median(times), statistics.median(loops), statistics.median(cpus), nbytes, used


def run_mergekit(cfg: dict, timeout: float) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.yml"
        p.write_text(yaml.safe_dump(cfg))
        exe = shutil.which("mergekit-yaml") or "mergekit-yaml"
        t0 = time.perf_counter()
        try:
            subprocess.run([exe, str(p), str(Path(tmp) / "out"), "--no-copy-tokenizer", "-j", "2"], check=True,
                           capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - t0


def ab(root: Path, methods: list[str], repeat: int) -> None:
    """Runs of small tensors vs tensor by tensor on moe-small, interleaved (wall and CPU medians)."""
    from fastmerge.engine import stream

    base, fts = family(root, "moe-small", SMALL)
    small = stream.SMALL_NUMEL
    for method in methods:
        for engine in ("native", "torch"):
            res: dict[str, list[tuple[float, float, float]]] = {"runs": [], "one by one": []}
            for _ in range(repeat):
                for mode in res:
                    stream.SMALL_NUMEL = small if mode == "runs" else 0
                    w, loop, cpu, nbytes, _ = run_fastmerge(config(method, base, fts), engine, 1)
                    res[mode].append((w, loop, cpu))
            stream.SMALL_NUMEL = small
            med = {m: [statistics.median(x[k] for x in v) for k in range(3)] for m, v in res.items()}
            for mode, (w, loop, cpu) in med.items():
                print(f"{method:7s} {engine:6s} {mode:10s} wall {w:6.2f} s, merge loop {loop:6.2f} s, CPU {cpu:6.2f} s",
                      flush=True)
            print(f"{method:7s} {engine:6s} one by one / runs: wall {med['one by one'][0] / med['runs'][0]:.2f}x, merge loop "
                  f"{med['one by one'][1] / med['runs'][1]:.2f}x, CPU {med['one by one'][2] / med['runs'][2]:.2f}x", flush=True)


def against(root: Path, old: str, methods: list[str], repeat: int, warm: int = 0, small: str = "moe-small") -> None:
    """This tree vs the fastmerge installed at ``old`` (a ``pip install --target`` directory) on ``small`` (a family
    of small tensors: moe-small, moe-16k or moe-64k) and dense-large: each merge a child process (``fastmerge.merge``
    timed inside it, planning included), the two installs alternated within each round; medians of ``repeat``
    rounds, and of the rounds' large/small ratios.
    ``warm`` > 0: each child merges ``warm`` + 1 times in-process and keeps the last ``warm`` (a merge in a fresh
    process pays first-call costs and a cold allocator, ~0.1 s of noise against changes of a few hundredths), and
    the merge report's time (``MergeReport.wall_s``) is printed beside the wall time."""
    from ab_inprocess import command

    fams = {small: family(root, small, SHAPES[small]), "dense-large": family(root, "dense-large", LARGE)}
    runs = warm + 1 if warm else 1
    for method in methods:
        for engine in ("native", "torch"):
            res: dict[tuple[str, str], list[tuple[float, float]]] = {}
            nbytes: dict[str, int] = {}
            for _ in range(repeat):
                for name, (base, fts) in fams.items():
                    for side in ("before", "after"):
                        with tempfile.TemporaryDirectory() as tmp:
                            out_dir = tmp + "/out"
                            child = ("import shutil, time, fastmerge\n"
                                     f"for i in range({runs}):\n"
                                     f"    shutil.rmtree({out_dir!r}, ignore_errors=True)\n"
                                     "    t = time.perf_counter()\n"
                                     f"    r = fastmerge.merge({config(method, base, fts)!r}, {out_dir!r}, threads=2, progress=False)\n"
                                     f"    if i >= {runs - (warm or 1)}: print(time.perf_counter() - t, r.wall_s, r.bytes_read)\n")
                            env = {**os.environ, "FASTMERGE_FASTPATH": "1" if engine == "native" else "0"}
                            out = subprocess.run(command(old, child) if side == "before" else [sys.executable, "-c", child],
                                                 capture_output=True, text=True, check=True, cwd=tmp, env=env).stdout
                            for line in out.strip().splitlines()[-(warm or 1):]:
                                wall, loop, read = line.split()
                                res.setdefault((name, side), []).append((float(wall), float(loop)))
                                nbytes[name] = int(read)
            for side in ("before", "after"):
                mine, big = res[(small, side)], res[("dense-large", side)]
                ratios = [(s[0] / nbytes[small]) / (b[0] / nbytes["dense-large"]) for s, b in zip(mine, big)]
                print(f"{method:7s} {engine:6s} {side:6s}: {small} {statistics.median(x[0] for x in mine):.3f} s "
                      f"(report {statistics.median(x[1] for x in mine):.3f} s), dense-large "
                      f"{statistics.median(x[0] for x in big):.3f} s (report {statistics.median(x[1] for x in big):.3f} s), "
                      f"large/small throughput {statistics.median(ratios):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)})",
                      flush=True)
            b, a = res[(small, "before")], res[(small, "after")]
            print(f"{method:7s} {engine:6s} {small} before/after: wall {statistics.median(x[0] / y[0] for x, y in zip(b, a)):.2f}x, "
                  f"report {statistics.median(x[1] / y[1] for x, y in zip(b, a)):.2f}x", flush=True)


#: ``--planning``'s child: the steps before a merge's first byte, timed in-process (no reading or writing), the medians
#: of ``runs`` plans in ms; the plan's columns taken as a merge takes them (the engine's choice first, then the digest)
_PLANNING_CHILD = """
import gc, json, statistics, sys, time
import fastmerge, fastmerge.engine as engine
from fastmerge.config import load_config
from fastmerge.engine import stream
from fastmerge.plan import build_plan, make_options
doc, runs = json.loads(sys.argv[1]), int(sys.argv[2])
rows = []
for i in range(runs + 1):
    cfg = load_config(doc)
    gc.collect()
    t0 = time.perf_counter()
    p = build_plan(cfg, make_options(progress=False))
    t1 = time.perf_counter()
    gc.freeze()  # as a merge does once the plan is built (engine.distributed)
    engine.select(p)
    t2 = time.perf_counter()
    p.digest()
    t3 = time.perf_counter()
    k = p.method.native
    stream.batches(p, k is not None and k.elementwise, k is not None and k.segments is not None)
    t4 = time.perf_counter()
    gc.unfreeze()
    if i:  # the first: imports and a cold allocator
        rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
    del p
print(json.dumps([statistics.median(r[k] for r in rows) * 1000 for k in range(5)]))
"""


def planning(root: Path, families: list[str], methods: list[str], repeat: int, old: str | None) -> None:
    """The planning steps alone on the families of small tensors (``--planning``): ``build_plan``, the engine's choice,
    the digest and the engine's runs, each a median over 7 plans in a child process; with ``--against DIR``, this
    tree and the install in DIR alternating, ``repeat`` children each."""
    from ab_inprocess import command

    sides = {"this tree": [sys.executable, "-c", _PLANNING_CHILD]}
    if old:
        sides = {"before": command(old, _PLANNING_CHILD), "after": sides["this tree"]}
    shapes = {**{n: (sh, False) for n, sh in SHAPES.items()}, "moe-fp8": (FP8, True)}
    for name in [n for n in families if n in shapes]:
        base, fts = family(root, name, shapes[name][0], fp8=shapes[name][1])
        for method in methods:
            got: dict[str, list[list[float]]] = {side: [] for side in sides}
            for _ in range(repeat):
                for side, argv in sides.items():
                    out = subprocess.run([*argv, json.dumps(config(method, base, fts)), "7"], capture_output=True, text=True,
                                         check=True, env={**os.environ, "FASTMERGE_FASTPATH": "1"}).stdout
                    got[side].append(json.loads(out.strip().splitlines()[-1]))
            for side, rows in got.items():
                med = [statistics.median(r[k] for r in rows) for k in range(5)]
                print(f"planning {name:9s} {method:7s} {side:9s}: build_plan {med[0]:6.1f} ms, engine choice {med[1]:5.1f} ms, "
                      f"digest {med[2]:5.1f} ms, runs {med[3]:5.1f} ms; all {med[4]:6.1f} ms "
                      f"({med[4] * 1000 / len(shapes[name][0].tensors()):.2f} us a tensor)", flush=True)
            if old:
                ratio = [b[4] / a[4] for b, a in zip(got["before"], got["after"])]
                print(f"planning {name:9s} {method:7s} before/after: {statistics.median(ratio):.2f}x "
                      f"(rounds {', '.join(f'{r:.2f}' for r in ratio)})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "fastmerge-moe"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mergekit", action="store_true")
    ap.add_argument("--mergekit-timeout", type=float, default=900)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--methods", default="ties,linear")
    ap.add_argument("--families", default="moe-small,dense-large,moe-fp8")
    ap.add_argument("--ab", action="store_true", help="moe-small with and without the runs of small tensors")
    ap.add_argument("--against", help="a pip install --target directory of another fastmerge: before/after, child processes")
    ap.add_argument("--warm", type=int, default=0, help="with --against: merges kept per child after one warm-up merge")
    ap.add_argument("--planning", action="store_true",
                    help="the planning steps alone (no I/O) on the families of small tensors; with --against, before/after")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    if a.planning:
        return planning(root, a.families.split(","), a.methods.split(","), a.repeat, a.against)
    if a.ab:
        return ab(root, a.methods.split(","), a.repeat)
    if a.against:
        small = next((n for n in a.families.split(",") if n in SHAPES), "moe-small")
        return against(root, a.against, a.methods.split(","), a.repeat, a.warm, small)
    shapes = {**{n: (sh, False) for n, sh in SHAPES.items()}, "dense-large": (LARGE, False), "dense-bench": (BENCH, False),
              "moe-real": (REAL, False), **({"moe-fp8": (FP8, True)} if a.fp8 else {})}
    fams = {n: family(root, n, sh, fp8=f) for n, (sh, f) in shapes.items() if n in a.families.split(",")}
    print(f"moe-small: {len(SMALL.tensors())} tensors/model; dense-large: {len(LARGE.tensors())} tensors/model; moe-real: "
          f"{len(REAL.tensors())} tensors/model", flush=True)
    for name, (base, fts) in fams.items():
        builds, digests, cpus = [], [], []
        for _ in range(a.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            plan = fastmerge.plan(config("ties", base, fts))
            t1 = time.perf_counter()
            plan.digest()
            builds.append(t1 - t0)
            digests.append(time.perf_counter() - t1)
            cpus.append(time.process_time() - c0)
        print(f"plan {name}: {len(plan.tensors)} tensors, build_plan {statistics.median(builds):.2f} s, "
              f"digest {statistics.median(digests):.2f} s (CPU of both {statistics.median(cpus):.2f} s)", flush=True)
    rows, loops = {}, {}
    for method in a.methods.split(","):
        for engine in ("native", "torch"):
            # the families alternate within each round (the machine's speed drifts over minutes: a ratio of two
            # medians taken minutes apart mixes that in); the ratio is the median of the rounds' ratios
            runs: dict[str, list[tuple[float, float, float, int, str]]] = {name: [] for name in fams}
            for _ in range(a.repeat):
                for name, (base, fts) in fams.items():
                    runs[name].append(run_fastmerge(config(method, base, fts), engine, 1))
            for name, got in runs.items():
                wall, loop, cpu = (statistics.median(x[k] for x in got) for k in range(3))
                nbytes, used = got[0][3], got[0][4]
                rows[(method, name, engine)] = [x[3] / x[0] / 1e9 for x in got]
                loops[(method, name, engine)] = [x[3] / x[1] / 1e9 for x in got]  # the report's "GB/s of input"
                print(f"{method:7s} {name:12s} engine={used:6s} {wall:7.2f} s (merge loop {loop:6.2f} s, CPU {cpu:6.2f} s)  "
                      f"{nbytes / 1e6:8.1f} MB  {nbytes / wall / 1e9:6.3f} GB/s", flush=True)
            for dense in ("dense-large", "dense-bench"):
                big = rows.get((method, dense, engine))
                for name in (*SHAPES, "moe-real"):
                    s = rows.get((method, name, engine))
                    if s and big:
                        per_round = [b / x for b, x in zip(big, s)]
                        print(f"{method} {engine}: {dense} / {name} throughput ratio {statistics.median(per_round):.2f} "
                              f"(rounds: {', '.join(f'{r:.2f}' for r in per_round)})", flush=True)
                        per_round = [b / x for b, x in zip(loops[(method, dense, engine)], loops[(method, name, engine)])]
                        print(f"{method} {engine}: {dense} / {name} merge report's GB/s ratio {statistics.median(per_round):.2f} "
                              f"(rounds: {', '.join(f'{r:.2f}' for r in per_round)})", flush=True)
        if a.mergekit:
            for name, (base, fts) in fams.items():
                if name in ("moe-small", "dense-large"):
                    t = run_mergekit(config(method, base, fts), a.mergekit_timeout)
                    print(f"{method:7s} {name:12s} mergekit       " + (f"{t:7.2f} s" if t else f"> {a.mergekit_timeout:.0f} s"),
                          flush=True)
        f_n, f_t = rows.get((method, "moe-fp8", "native")), rows.get((method, "moe-fp8", "torch"))
        if f_n and f_t:
            print(f"{method} moe-fp8: native engine {statistics.median(f_n) / statistics.median(f_t):.2f}x the torch engine's "
                  "throughput", flush=True)


if __name__ == "__main__":
    sys.exit(main())
