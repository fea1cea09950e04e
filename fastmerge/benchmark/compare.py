"""``fastmerge bench compare A.json B.json``: B's times relative to A's, case by case.

Cases are matched by their key (kernels: method, backend, shape, T, dtype; merge: config and run). For
each, ``ratio = median_B / median_A`` (> 1: B is slower). The noise band of a case is the sum of the two
runs' spreads (interquartile range / median), at least ``min_tolerance``; B is a **regression** where
``ratio > 1 + band`` and an **improvement** where ``ratio < 1 / (1 + band)``, else within noise. The
command exits 1 when any case regressed (for CI), 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MIN_TOLERANCE = 0.05


def case_key(doc: dict, row: dict) -> str:
    if doc["kind"] == "kernels":
        return f"{row['method']} {row['backend']} {'x'.join(map(str, row['shape']))} T={row['models']} {row['dtype']}"
    return f"{row['name']} {row['what']}"


@dataclasses.dataclass(frozen=True)
class Delta:
    key: str
    a_s: float
    b_s: float
    ratio: float
    band: float
    verdict: str  # "regression" | "improvement" | "same"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _timed(doc: dict) -> dict[str, dict]:
    return {case_key(doc, r): r["time"] for r in doc["results"] if "time" in r and r.get("status", "ok") == "ok"}


def compare(a: dict, b: dict, min_tolerance: float = MIN_TOLERANCE) -> tuple[list[Delta], list[str]]:
    """(deltas of the cases both documents timed, notes: cases only in one, different kinds or machines)."""
    notes: list[str] = []
    if a.get("kind") != b.get("kind"):
        raise ValueError(f"compare: A is a '{a.get('kind')}' run, B a '{b.get('kind')}' run")
    ma, mb = a.get("machine", {}), b.get("machine", {})
    for k in ("cpu_model", "cpu_count"):
        if ma.get(k) != mb.get(k):
            notes.append(f"machines differ: {k} {ma.get(k)!r} vs {mb.get(k)!r}")
    ga, gb = (ma.get("gpu") or {}).get("name"), (mb.get("gpu") or {}).get("name")
    if ga != gb:
        notes.append(f"machines differ: GPU {ga!r} vs {gb!r}")
    va, vb = ma.get("versions", {}), mb.get("versions", {})
    for k in sorted(set(va) | set(vb)):
        if va.get(k) != vb.get(k):
            notes.append(f"{k}: {va.get(k)} -> {vb.get(k)}")
    ta, tb = _timed(a), _timed(b)
    only_a = sorted(set(ta) - set(tb))
    only_b = sorted(set(tb) - set(ta))
    if only_a:
        notes.append(f"{len(only_a)} case(s) only in A: " + "; ".join(only_a[:5]) + (" ..." if len(only_a) > 5 else ""))
    if only_b:
        notes.append(f"{len(only_b)} case(s) only in B: " + "; ".join(only_b[:5]) + (" ..." if len(only_b) > 5 else ""))
    out = []
    for k in (k for k in ta if k in tb):
        x, y = ta[k], tb[k]
        ratio = y["median_s"] / x["median_s"] if x["median_s"] > 0 else float("inf")
        band = max(min_tolerance, x.get("spread", 0.0) + y.get("spread", 0.0))
        verdict = "regression" if ratio > 1 + band else "improvement" if ratio < 1 / (1 + band) else "same"
        out.append(Delta(k, x["median_s"], y["median_s"], ratio, band, verdict))
    return out, notes


def table(deltas: list[Delta], notes: list[str], a_name: str = "A", b_name: str = "B") -> str:
    lines = [f"B / A: {b_name} against {a_name} (ratio > 1: B slower; flagged beyond the noise band = the sum of both spreads, "
             f"at least {100 * MIN_TOLERANCE:.0f} %)", "",
             "| case | A ms | B ms | B / A | noise band | verdict |", "|---|---|---|---|---|---|"]
    mark = {"regression": "**REGRESSION**", "improvement": "improvement", "same": "within noise"}
    for d in deltas:
        lines.append(f"| {d.key} | {d.a_s * 1e3:.3g} | {d.b_s * 1e3:.3g} | {d.ratio:.2f} | ±{100 * d.band:.0f} % | {mark[d.verdict]} |")
    n = {v: sum(d.verdict == v for d in deltas) for v in mark}
    lines += ["", f"{len(deltas)} cases: {n['regression']} regression(s), {n['improvement']} improvement(s), {n['same']} within noise"]
    if notes:
        lines += ["", *[f"note: {x}" for x in notes]]
    return "\n".join(lines)


def load(path: str | Path) -> dict:
    from .report import validate

    doc = json.loads(Path(path).read_text())
    errs = validate(doc)
    if errs:
        raise ValueError(f"{path}: not a fastmerge bench document: " + "; ".join(errs[:3]))
    return doc


def run(a_path: str | Path, b_path: str | Path, json_out: str | Path | None = None,
        min_tolerance: float = MIN_TOLERANCE) -> tuple[str, bool, dict[str, Any]]:
    """(the table, whether anything regressed, the comparison as a JSON-able dict)."""
    a, b = load(a_path), load(b_path)
    deltas, notes = compare(a, b, min_tolerance)
    doc = {"a": str(a_path), "b": str(b_path), "min_tolerance": min_tolerance, "notes": notes,
           "cases": [d.as_dict() for d in deltas]}
    if json_out:
        Path(json_out).write_text(json.dumps(doc, indent=1))
    return table(deltas, notes, str(a_path), str(b_path)), any(d.verdict == "regression" for d in deltas), doc
