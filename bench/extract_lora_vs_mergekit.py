"""fastmerge extract-lora vs mergekit-extract-lora, side by side on one family (run by hand, not collected):

    python bench/extract_lora_vs_mergekit.py FAMILY_DIR [--max-rank 128] [--rounds 3] [--also randomized,exact]

FAMILY_DIR holds ``base/`` and ``ft1/`` (``fastmerge.testing.make_family``; the 168M benchmark shape is
hidden 1024, 8 layers, intermediate 2816, vocab 32000, bf16). Each tool runs as a child process on the same
files (page cache warmed first), alternating within each round (mergekit first in odd rounds); wall times
include interpreter start, and each run's CPU time (user + system of the child) is printed beside it, which
says how much of a wall time was waiting for a busy machine. ``--also``: fastmerge with other ``--svd``
values. Then the Frobenius reconstruction error of every factored module, relative to the optimal truncated
SVD at the same rank (exact svdvals). The first line gives the versions and the load average at the start.
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


def _warm(p: Path) -> None:
    for f in p.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _time(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one child process."""
    t, c = time.perf_counter(), os.times()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c2 = os.times()
    return time.perf_counter() - t, (c2.children_user - c.children_user) + (c2.children_system - c.children_system)


def _ratios(fam: Path, ad: Path, k: int) -> list[float]:
    import torch
    from safetensors.torch import load_file

    def sd(p: Path) -> dict:
        out = {}
        for f in sorted(p.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    b, f, a = sd(fam / "base"), sd(fam / "ft1"), load_file(ad / "adapter_model.safetensors")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    out = []
    for key, A in a.items():
        if not key.endswith("lora_A.weight"):
            continue
        mod = key[len("base_model.model."):-len(".lora_A.weight")]
        B = a[key.replace("lora_A", "lora_B")]
        r = cfg.get("rank_pattern", {}).get(mod, cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(mod, cfg["lora_alpha"])
        d = f[mod + ".weight"].float() - b[mod + ".weight"].float()
        s = torch.linalg.svdvals(d)
        opt = s[A.shape[0]:].square().sum().sqrt()
        out.append(float((d - (alpha / r) * B.float() @ A.float()).norm() / opt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family", type=Path)
    ap.add_argument("--max-rank", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--also", default="", help="comma-separated extra fastmerge --svd values (randomized, exact)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fm_extract_bench")
    a = ap.parse_args()
    from importlib.metadata import version

    import platform

    print(f"python {platform.python_version()}, " + ", ".join(f"{p} {version(p)}" for p in ("numpy", "torch", "mergekit", "fastmerge"))
          + f"; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    _warm(a.family)
    common = ["--model", str(a.family / "ft1"), "--base-model", str(a.family / "base"), "--max-rank", str(a.max_rank)]
    cmds = {
        "fastmerge": [sys.executable, "-m", "fastmerge", "extract-lora", *common, "--overwrite"],
        "mergekit": [shutil.which("mergekit-extract-lora") or "mergekit-extract-lora", *common],
    }
    for kind in filter(None, a.also.split(",")):
        cmds[f"fastmerge-{kind}"] = [sys.executable, "-m", "fastmerge", "extract-lora", *common, "--overwrite", "--svd", kind]
    res: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    for r in range(a.rounds):
        order = list(cmds) if r % 2 else list(reversed(cmds))
        for name in order:
            out = a.out / name
            shutil.rmtree(out, ignore_errors=True)
            res[name].append(_time(cmds[name] + ["--out-path", str(out)]))
            wall, cpu = res[name][-1]
            print(f"round {r + 1} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {os.getloadavg()[0]:.1f}", flush=True)
    for name in cmds:
        r = _ratios(a.family, a.out / name, a.max_rank)
        print(f"{name}: median wall {statistics.median(w for w, _ in res[name]):.1f} s, CPU "
              f"{statistics.median(c for _, c in res[name]):.1f} s; error / optimal over {len(r)} modules: "
              f"max {max(r):.4f}, median {statistics.median(r):.4f}")
    speed = [m[0] / f[0] for f, m in zip(res["fastmerge"], res["mergekit"])]
    print(f"speed-up vs mergekit (wall): median {statistics.median(speed):.1f}x per round {[round(x, 1) for x in speed]}; "
          f"of the medians {statistics.median(w for w, _ in res['mergekit']) / statistics.median(w for w, _ in res['fastmerge']):.1f}x")


if __name__ == "__main__":
    main()
