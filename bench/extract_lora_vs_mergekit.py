"""fastmerge extract-lora vs mergekit-extract-lora, side by side on one family (run by hand, not collected):

    python bench/extract_lora_vs_mergekit.py FAMILY_DIR [--max-rank 128] [--rounds 1]

FAMILY_DIR holds ``base/`` and ``ft1/`` (``fastmerge.testing.make_family``; the 168M benchmark shape is
hidden 1024, 8 layers, intermediate 2816, vocab 32000, bf16). Each tool runs as a child process on the same
files (page cache warmed first); wall times include interpreter start. Then the Frobenius reconstruction
error of every factored module, relative to the optimal truncated SVD at the same rank (exact svdvals).
"""

from __future__ import annotations

import argparse
import json
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


def _time(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


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
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fm_extract_bench")
    a = ap.parse_args()
    _warm(a.family)
    common = ["--model", str(a.family / "ft1"), "--base-model", str(a.family / "base"), "--max-rank", str(a.max_rank)]
    res: dict[str, list[float]] = {"fastmerge": [], "fastmerge-exact": [], "mergekit": []}
    cmds = {
        "fastmerge": [sys.executable, "-m", "fastmerge", "extract-lora", *common, "--overwrite"],
        "fastmerge-exact": [sys.executable, "-m", "fastmerge", "extract-lora", *common, "--overwrite", "--svd", "exact"],
        "mergekit": [shutil.which("mergekit-extract-lora") or "mergekit-extract-lora", *common],
    }
    for _ in range(a.rounds):
        for name, cmd in cmds.items():
            out = a.out / name
            shutil.rmtree(out, ignore_errors=True)
            res[name].append(_time(cmd + ["--out-path", str(out)]))
            print(f"{name}: {res[name][-1]:.1f} s", flush=True)
    for name in cmds:
        r = _ratios(a.family, a.out / name, a.max_rank)
        print(f"{name}: median wall {statistics.median(res[name]):.1f} s; error / optimal over {len(r)} modules: "
              f"max {max(r):.4f}, median {statistics.median(r):.4f}")
    print(f"speed-up vs mergekit: {statistics.median(res['mergekit']) / statistics.median(res['fastmerge']):.1f}x")


if __name__ == "__main__":
    main()
