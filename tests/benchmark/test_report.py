"""The JSON document against its schema, the table, and `compare` on planted regressions."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pytest

from fastmerge import _native
from fastmerge.benchmark import compare, kernels, report
from fastmerge.benchmark.timing import CpuTimer


def _doc() -> dict:
    s = kernels.Settings(device="cpu", methods=("task_arithmetic", "ties"), backends=("native", "torch", "nope"),
                         shapes=((64, 48),), models=(2,), repeats=3, max_seconds=0.2)
    return kernels.run(s, progress=False, timer=CpuTimer())


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads(json.dumps(_doc()))  # what a file holds


def test_document_is_valid_and_complete(doc):
    assert report.validate(doc) == []
    assert doc["schema_version"] == report.SCHEMA_VERSION and doc["kind"] == "kernels"
    m = doc["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["versions"]["torch"]
    rows = {(r["method"], r["backend"]): r for r in doc["results"]}
    assert rows[("ties", "nope")]["status"] == "skipped" and "unknown backend" in rows[("ties", "nope")]["note"]
    t = rows[("ties", "torch")]
    assert t["status"] == "ok" and t["bytes"] == 2 * 3 * 64 * 48 * 2 + 64 * 48 * 2
    assert t["gbps"] == pytest.approx(t["bytes"] / t["time"]["median_s"] / 1e9)
    assert t["pct_of_copy"] == pytest.approx(100 * t["gbps"] / doc["copy"]["gbps"])
    if _native.HAS_CPU_EXT:
        n = rows[("ties", "native")]
        assert n["speedup_vs_torch"] == pytest.approx(t["time"]["median_s"] / n["time"]["median_s"])
    assert "passes" in doc["byte_rule"] and doc["byte_rules"]["ties"].startswith("every input")
    assert "| ties | 64x48 | 2 |" in report.table(doc)


def test_validator_reports_breaks(doc):
    bad = copy.deepcopy(doc)
    del bad["machine"]["cpu_model"]
    bad["results"][0]["shape"] = "64x48"
    bad["results"][1]["status"] = "fine"
    bad["schema_version"] = 99
    errs = report.validate(bad)
    assert any("schema_version" in e for e in errs)
    bad["schema_version"] = report.SCHEMA_VERSION
    errs = report.validate(bad)
    assert any("cpu_model" in e for e in errs)
    assert any("results[0].shape" in e for e in errs)
    assert any("results[1].status" in e for e in errs)
    assert report.check(1.5, {"type": ["integer"]}) and not report.check(2, {"type": ["number"]})
    assert report.check(True, {"type": ["integer"]})  # a bool is not a number here


def _scaled(doc: dict, key: str, factor: float) -> dict:
    d = copy.deepcopy(doc)
    for r in d["results"]:
        if r.get("status") == "ok" and compare.case_key(d, r) == key:
            t = r["time"]
            t["times_s"] = [x * factor for x in t["times_s"]]
            for k in ("median_s", "q1_s", "q3_s", "min_s", "max_s"):
                t[k] *= factor
    return d


def _quiet(doc: dict) -> dict:
    """The same document with a 2 % spread everywhere (real runs vary; the test must not depend on it)."""
    d = copy.deepcopy(doc)
    for r in d["results"]:
        if "time" in r:
            m = r["time"]["median_s"]
            r["time"].update(q1_s=0.99 * m, q3_s=1.01 * m, spread=0.02)
    return d


def test_compare_flags_a_planted_regression_and_not_noise(doc, tmp_path):
    a = _quiet(doc)
    keys = [compare.case_key(a, r) for r in a["results"] if r.get("status") == "ok"]
    slow, noisy = keys[0], keys[1]
    b = _scaled(_scaled(a, slow, 2.0), noisy, 1.03)  # 2x slower; 3 % slower, within 2 + 2 % spread
    deltas, _ = compare.compare(a, b)
    verdict = {d.key: d.verdict for d in deltas}
    assert verdict[slow] == "regression"
    assert verdict[noisy] == "same"
    assert all(v == "same" for k, v in verdict.items() if k not in (slow, noisy))
    # faster beyond the band: an improvement
    c = _scaled(a, slow, 0.5)
    assert {d.key: d.verdict for d in compare.compare(a, c)[0]}[slow] == "improvement"
    # a wide measured spread absorbs the same 2x: not flagged
    wide = copy.deepcopy(a)
    for r in wide["results"]:
        if r.get("status") == "ok" and compare.case_key(wide, r) == slow:
            r["time"]["spread"] = 1.5
    assert {d.key: d.verdict for d in compare.compare(wide, b)[0]}[slow] == "same"
    # the command: exit 1 on the regression, 0 without
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    text, regressed, cdoc = compare.run(pa, pb)
    assert regressed and "REGRESSION" in text and slow in text
    assert compare.run(pa, pa)[1] is False


def test_quick_command_under_a_minute(tmp_path):
    out = tmp_path / "quick.json"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "fastmerge", "bench", "kernels", "--quick", "--json", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert took < 60, f"--quick took {took:.1f} s"
    d = json.loads(out.read_text())
    assert report.validate(d) == []
    assert d["settings"]["quick"] and any(r["status"] == "ok" for r in d["results"])
    assert "| method | shape |" in p.stdout and "copy bandwidth" in p.stdout
    # compare of a run with itself: nothing regressed, exit 0
    c = subprocess.run([sys.executable, "-m", "fastmerge", "bench", "compare", str(out), str(out)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert c.returncode == 0 and "0 regression(s)" in c.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastmerge", "bench", "kernels", "--shapes", "12xq"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "--shapes" in p.stderr and "Traceback" not in p.stderr


def test_plot(doc, tmp_path):
    pytest.importorskip("matplotlib")
    path = report.plot(doc, str(tmp_path / "roof.png"))
    assert (tmp_path / "roof.png").stat().st_size > 1000 and path.endswith(".png")
