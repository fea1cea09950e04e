"""1 vs 2 ranks of ``fastmerge merge`` (gloo, this machine) and a model of 8 GPUs / 8 nodes from the
measured per-rank throughput.

    python bench/bench_distributed.py [--hidden 1024 --layers 8] [--root DIR]

Each run is ``python -m fastmerge merge`` per rank with torchrun's environment (what torchrun starts);
the wall time is the launcher's (processes started to all exited: interpreter, torch import, process
group, plan, merge, commit), and the merge time is rank 0's report (plan built to OUT renamed). The
outputs of 1 and 2 ranks are compared byte for byte.

The model (printed with the numbers): a merge is read-bound; a rank merges at the throughput r measured
here for one rank (bytes of input per second of merge) as long as its storage delivers it; with N ranks
on a node sharing a node-local read bandwidth B_node, or N nodes each with its own, time ≈ t_fixed +
max_rank_bytes / min(r, B / ranks_per_node), where max_rank_bytes comes from the LPT partition of the
real plan (``engine.distributed.partition``) and t_fixed (start, plan, commit) is measured.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(world: int, cfg: Path, out: Path, extra: list[str]) -> tuple[float, float, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    procs = []
    for r in range(world):
        env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(r), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if world == 1:
            env.pop("WORLD_SIZE")
        procs.append(subprocess.Popen([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out), "-q", *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    assert all(p.returncode == 0 for p in procs), outs
    m = re.search(r"in ([0-9.]+) s", outs[0][0])
    return wall, float(m.group(1)) if m else float("nan"), outs[0][0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "fastmerge-dist-bench"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shard", default="100M")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import yaml

    from fastmerge import plan as make_plan
    from fastmerge.engine.distributed import partition
    from fastmerge.testing import LlamaShape, make_family

    root = Path(a.root)
    shape = LlamaShape(hidden=a.hidden, layers=a.layers, intermediate=int(a.hidden * 2.75), vocab=32000,
                       heads=max(1, a.hidden // 64))
    fam = root / f"fam-{a.hidden}-{a.layers}"
    if not (fam / "ft2").is_dir():
        make_family(fam, shape, n_finetunes=2, dtype="bfloat16", shard_bytes=100_000_000)
    base, fts = fam / "base", [fam / "ft1", fam / "ft2"]
    cfg = root / "ties.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
                                   "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}}
                                              for f in fts]}))
    extra = ["--out-shard-size", a.shard, "--overwrite"]
    p = make_plan(cfg, None, out_shard_size=a.shard)
    print(f"family: {shape.numel / 1e6:.0f}M parameters/model, bf16, base + 2; ties; {p.in_bytes / 1e9:.2f} GB "
          f"input, {len(p.shards)} output shards of {a.shard}; {os.cpu_count()} CPUs")
    res = {}
    outs = {}
    for world in (1, 2):
        out = root / f"out-{world}"
        best = None
        for _ in range(a.rounds):
            wall, merge_s, _ = run(world, cfg, out, extra)
            best = (wall, merge_s) if best is None or wall < best[0] else best
        res[world] = best
        outs[world] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
        print(f"  {world} rank(s): wall {best[0]:.2f} s (launch to exit), merge {best[1]:.2f} s (rank 0's report), "
              f"{p.in_bytes / best[1] / 1e9:.2f} GB/s of input")
    print(f"  outputs of 1 and 2 ranks byte-identical: {outs[1] == outs[2]}")
    r = p.in_bytes / res[1][1]  # one rank's measured throughput
    print(f"  measured speed-up (merge time): {res[1][1] / res[2][1]:.2f}x with 2 ranks on {os.cpu_count()} cores")
    fixed = max(res[1][0] - res[1][1], 0.0)
    print(f"model (CPU rank here: r = {r / 1e9:.2f} GB/s measured; t_fixed = {fixed:.1f} s measured start+import; "
          "a GPU rank: min(20 GB/s assumed merge ceiling, the node's read bandwidth / its ranks); shards equal-sized; "
          "no contention between nodes on the shared filesystem beyond each node's own bandwidth):")
    for n in (1, 2, 8):
        print(f"  CPU ranks on independent cores/disks, this family: {n} rank(s) {fixed + p.in_bytes / n / r:.1f} s")
    for label, in_bytes, shards in (("Llama-3.1-405B ties (3 models, 2.44 TB in, 191 shards)", 2.44e12, 191),
                                    ("DeepSeek-V3 ties (3 models, 4.03 TB in, 270 shards)", 4.03e12, 270)):
        w = [in_bytes / shards] * shards
        for n, per_node_bw, what in ((1, 6e9, "1 GPU, NVMe 6 GB/s"), (8, 6e9, "8 GPUs, 1 node, NVMe 6 GB/s shared"),
                                     (8, 25e9, "8 GPUs, 1 node, 25 GB/s striped NVMe"),
                                     (64, 6e9, "8 nodes x 8 GPUs, each node 6 GB/s")):
            per_rank = min(20e9, per_node_bw / min(n, 8))  # a GPU rank: 20 GB/s merge ceiling (H100, PCIe 5)
            t = fixed + max(partition([int(x) for x in w], n).loads) / per_rank
            print(f"  {label}, {what}: {t / 60:.1f} min")


if __name__ == "__main__":
    main()
