"""`fastmerge bench merge`: a tiny family, one run, the document and its stages."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from fastmerge.benchmark import merge, report
from fastmerge.testing import LlamaShape, make_family


def test_bench_merge_tiny(tmp_path):
    root = tmp_path / "fam"
    make_family(root, LlamaShape(hidden=64, layers=2, intermediate=176, vocab=320, heads=4), n_finetunes=2,
                dtype="bfloat16", shard_bytes=50_000, seed=0)
    cfg = tmp_path / "ties.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(root / "base"), "dtype": "bfloat16",
                                   "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": 0.5, "density": 0.5}}
                                              for i in (1, 2)]}))
    doc = merge.run(cfg, repeat=2, workdir=tmp_path, device="cpu", progress=False)
    assert report.validate(json.loads(json.dumps(doc))) == []
    floor, run = doc["results"]
    assert floor["what"] == "floor" and run["what"] == "merge"
    assert run["time"]["repeats"] == 2 and run["input_bytes"] == floor["input_bytes"] > 0
    st = run["stages"]
    assert st["read_s"] > 0 and st["write_s"] > 0 and st["compute_s"] > 0
    assert st["bound_by"] in ("read", "compute", "write")
    assert run["vs_floor"] > 0 and run["peak_rss_mb"] > 0
    assert not list(tmp_path.glob(".fastmerge-bench-*"))  # outputs deleted
    assert "| ties.yml | merge |" in report.table(doc)
    # the probes are removed after the run
    from fastmerge.io.writer import ShardWriter

    assert ShardWriter.write.__qualname__ == "ShardWriter.write"
    # the command
    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, "-m", "fastmerge", "bench", "merge", str(cfg), "--repeat", "1", "--json", str(out),
                        "--no-progress", "--device", "cpu", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert report.validate(json.loads(out.read_text())) == [] and "bound by" in p.stdout
