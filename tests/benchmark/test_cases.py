"""The case matrix: shapes, dtypes, defaults, memory skips; the benchmark's place in the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastmerge
from fastmerge.benchmark import kernels
from fastmerge.benchmark.kernels import Case, add_speedups, parse_dtypes, parse_shapes


def test_shapes_and_dtypes():
    assert parse_shapes("llama-8b") == ((4096, 4096), (4096, 14336), (128256, 4096))
    assert parse_shapes("64x48, 4096x4096,llama-8b") == ((64, 48), (4096, 4096), (4096, 14336), (128256, 4096))
    assert parse_shapes("llama-70b")[0] == (8192, 8192)
    for bad in ("64", "0x5", "axb", "llama-9b"):
        with pytest.raises(ValueError):
            parse_shapes(bad)
    assert parse_dtypes("bf16,fp32,bfloat16") == ("bfloat16", "float32")
    with pytest.raises(ValueError):
        parse_dtypes("int8")


def test_defaults_and_models_clamped():
    s = kernels.resolve("cpu", quick=True)
    assert s.shapes == ((1024, 2048),) and s.models == (2,) and s.repeats == 3 and 1 <= len(s.methods) <= 4
    full = kernels.resolve("cpu")
    assert full.shapes == tuple(kernels.PRESETS["llama-8b"]) and full.models == (3,)
    assert "ties" in full.methods and "karcher" not in full.methods  # karcher: no bandwidth rule
    assert "native" in full.backends and "torch" in full.backends
    s = kernels.resolve("cpu", methods="slerp,ties", models="1,4", shapes="8x8")
    assert [(c.method, c.models) for c in kernels.cases(s)] == [("slerp", 1), ("ties", 1), ("ties", 4)]
    with pytest.raises(Exception, match="did you mean"):
        kernels.resolve("cpu", methods="tie")
    with pytest.raises(ValueError, match="--backends"):
        kernels.resolve("cpu", backends="native,gpu")


def test_memory_skip_names_the_need(monkeypatch):
    monkeypatch.setattr(kernels, "_available_bytes", lambda device: 10_000)
    s = kernels.resolve("cpu", methods="linear", backends="native,torch", shapes="256x256", models="2", repeats=1)
    rows = kernels.run_case(Case("linear", (256, 256), 2, "bfloat16"), s, s.backends, None, None)
    assert {r["status"] for r in rows} == {"skipped"} and all("GB available" in r["note"] for r in rows)


def test_speedups():
    rows = [{"backend": "native", "status": "ok", "time": {"median_s": 1.0}},
            {"backend": "torch", "status": "ok", "time": {"median_s": 4.0}},
            {"backend": "mergekit", "status": "ok", "time": {"median_s": 8.0}},
            {"backend": "cuda", "status": "skipped"}]
    add_speedups(rows)
    assert rows[0]["speedup_vs_torch"] == 4.0 and rows[0]["speedup_vs_mergekit"] == 8.0
    assert rows[2]["speedup_vs_torch"] == 0.5 and "speedup_vs_torch" not in rows[1]


def test_nothing_below_the_front_door_imports_the_benchmark():
    pkg = Path(fastmerge.__file__).resolve().parent
    allowed = {pkg / "cli.py"}
    bad = []
    for p in pkg.rglob("*.py"):
        if (pkg / "benchmark") in p.parents or p in allowed:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any("benchmark" in m.split(".") for m in mods):
                bad.append(str(p.relative_to(pkg)))
    assert not bad, f"modules below the front door import fastmerge.benchmark: {bad}"
