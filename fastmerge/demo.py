"""``fastmerge demo``: the main job end to end on a generated family, checked against the reference.

Generates (once, cached) a small LLaMA-shaped family (base + 3 fine-tunes, bf16, sharded), merges it
with TIES through the streaming engine, reopens the output and compares every tensor with an
independent in-memory merge by the method's torch reference.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .testing import LlamaShape, make_family

DEMO_SHAPE = LlamaShape(hidden=384, layers=6, intermediate=1024, vocab=4000, heads=6)
DEMO_VERSION = "v1"


def cache_dir() -> Path:
    root = os.environ.get("FASTMERGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "fastmerge")
    return Path(root)


def demo_config(base: Path, fts: list[Path]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": 0.33, "density": 0.5}},
            {"model": str(fts[1]), "parameters": {"weight": [0.2, 0.4], "density": 0.5}},  # gradient over layers
            {"model": str(fts[2]), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}], "density": 0.3}},
        ],
        "parameters": {"normalize": True, "lambda": 1.0},
        "dtype": "bfloat16",
    }


def run_demo(cache: Path | None = None, out: Path | None = None, backend: str = "auto", threads: int = 0) -> int:
    from safetensors import safe_open

    from .api import merge, plan
    from .io.index import CheckpointIndex
    from .io.reader import ModelReader

    root = (cache or cache_dir() / "demo") / DEMO_VERSION
    marker = root / ".complete"
    if not marker.exists():
        print(f"generating a LLaMA-shaped family ({DEMO_SHAPE.numel / 1e6:.1f}M parameters x 4, bf16) in {root} ...")
        shutil.rmtree(root, ignore_errors=True)
        make_family(root, DEMO_SHAPE, n_finetunes=3, dtype="bfloat16", shard_bytes=20_000_000)
        marker.write_text("ok")
    base, fts = root / "base", [root / f"ft{i}" for i in (1, 2, 3)]
    cfg = demo_config(base, fts)
    out = out or root.parent / "demo-merged"
    report = merge(cfg, out, backend=backend, threads=threads, overwrite=True)
    print(report.summary())

    # Verify: an independent in-memory merge (torch reference) of every tensor, compared bit for bit.
    t0 = time.perf_counter()
    p = plan(cfg)
    out_ix = CheckpointIndex.open(out)
    readers = {}
    bad = 0
    for tp in p.tensors:
        got_info = out_ix.tensors[tp.name]
        with safe_open(str(got_info.file), framework="pt") as f:
            got = f.get_tensor(tp.name)
        srcs = [tp.base] + tp.sources
        vals = []
        for info in srcs:
            if info.file.parent not in readers:
                readers[info.file.parent] = ModelReader(CheckpointIndex.open(info.file.parent), mapped=False)
            r = readers[info.file.parent]
            vals.append(r.get(info))
        ref = p.method.reference(vals[1:], vals[0], tp.params).to(got.dtype)
        if not torch.equal(got.view(torch.int16), ref.view(torch.int16)):
            bad += 1
            print(f"MISMATCH {tp.name}: max |diff| {float((got.float() - ref.float()).abs().max()):.3g}")
    n = len(p.tensors)
    print(f"verified {n - bad}/{n} output tensors bit-identical to the torch reference ({time.perf_counter() - t0:.1f} s)")
    print(f"demo files: the generated family in {root} (kept as a cache), the merged model in {out}")
    return 0 if bad == 0 else 1
