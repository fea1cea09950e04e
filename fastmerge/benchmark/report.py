"""The table, the JSON document (and its schema) and the roofline chart of a benchmark run.

JSON documents (``--json FILE``) carry ``schema_version`` (this module's ``SCHEMA_VERSION``, raised on
any incompatible change) and ``kind`` ("kernels" or "merge"); ``SCHEMA`` describes both in a small
subset of JSON Schema (type, properties, required, items, enum) that ``validate`` checks without any
dependency. docs/benchmark.md documents every field.
"""

from __future__ import annotations

import math
from typing import Any

SCHEMA_VERSION = 1

_NUM = ["number"]
_OPT_NUM = ["number", "null"]
_STATS = {
    "type": "object",
    "required": ["median_s", "q1_s", "q3_s", "min_s", "max_s", "spread", "repeats", "times_s"],
    "properties": {"median_s": {"type": _NUM}, "q1_s": {"type": _NUM}, "q3_s": {"type": _NUM},
                   "min_s": {"type": _NUM}, "max_s": {"type": _NUM}, "spread": {"type": _NUM},
                   "repeats": {"type": ["integer"]}, "times_s": {"type": ["array"], "items": {"type": _NUM}}},
}
_MACHINE = {
    "type": "object",
    "required": ["date_utc", "cpu_model", "cpu_count", "mem_total_gb", "gpu", "versions"],
    "properties": {
        "date_utc": {"type": ["string"]}, "cpu_model": {"type": ["string"]}, "cpu_count": {"type": ["integer", "null"]},
        "mem_total_gb": {"type": _OPT_NUM},
        "gpu": {"type": ["object", "null"], "required": ["name", "driver", "cuda"],
                "properties": {"name": {"type": ["string"]}, "driver": {"type": ["string", "null"]},
                               "cuda": {"type": ["string", "null"]}}},
        "versions": {"type": "object", "required": ["python", "fastmerge", "torch", "mergekit", "native_cpu_ext"],
                     "properties": {"python": {"type": ["string"]}, "fastmerge": {"type": ["string"]},
                                    "torch": {"type": ["string"]}, "mergekit": {"type": ["string", "null"]},
                                    "triton": {"type": ["string", "null"]}, "native_cpu_ext": {"type": ["boolean"]}}},
    },
}
_KERNEL_ROW = {
    "type": "object",
    "required": ["method", "backend", "shape", "models", "dtype", "elements", "bytes", "byte_rule", "status"],
    "properties": {
        "method": {"type": ["string"]}, "backend": {"type": ["string"]},
        "shape": {"type": ["array"], "items": {"type": ["integer"]}}, "models": {"type": ["integer"]},
        "dtype": {"type": ["string"]}, "elements": {"type": ["integer"]}, "bytes": {"type": ["integer", "null"]},
        "passes": {"type": ["integer", "null"]}, "byte_rule": {"type": ["string"]},
        "status": {"enum": ["ok", "skipped", "error"]}, "note": {"type": ["string"]},
        "time": _STATS, "gbps": {"type": _NUM}, "pct_of_copy": {"type": _NUM},
        "speedup_vs_torch": {"type": _NUM}, "speedup_vs_mergekit": {"type": _NUM},
    },
}
_MERGE_ROW = {
    "type": "object",
    "required": ["name", "what", "time", "input_bytes", "output_bytes", "gbps_input"],
    "properties": {
        "name": {"type": ["string"]}, "what": {"enum": ["merge", "floor"]}, "time": _STATS,
        "input_bytes": {"type": ["integer"]}, "output_bytes": {"type": ["integer"]}, "gbps_input": {"type": _NUM},
        "vs_floor": {"type": _OPT_NUM}, "peak_rss_mb": {"type": _OPT_NUM}, "gpu_peak_mb": {"type": _OPT_NUM},
        "stages": {"type": ["object", "null"], "required": ["read_s", "compute_s", "write_s", "bound_by"],
                   "properties": {"read_s": {"type": _NUM}, "compute_s": {"type": _NUM}, "write_s": {"type": _NUM},
                                  "bound_by": {"enum": ["read", "compute", "write"]}}},
        "engine": {"type": ["string"]}, "backends": {"type": ["object"]},
    },
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema_version", "kind", "machine", "settings", "results"],
    "properties": {
        "schema_version": {"enum": [SCHEMA_VERSION]},
        "kind": {"enum": ["kernels", "merge"]},
        "command": {"type": ["string", "null"]},
        "machine": _MACHINE,
        "settings": {"type": ["object"]},
        "byte_rule": {"type": ["string"]},
        "byte_rules": {"type": ["object"]},
        "copy": {"type": ["object"], "required": ["buffer_bytes", "bytes_moved", "gbps", "median_s", "spread"]},
        "results": {"type": ["array"]},
    },
}
ROW_SCHEMA = {"kernels": _KERNEL_ROW, "merge": _MERGE_ROW}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def check(value: Any, schema: dict, path: str = "$") -> list[str]:
    """The places where ``value`` breaks ``schema`` (the subset: type, enum, required, properties, items)."""
    errs: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not one of {schema['enum']}")
    if isinstance(value, dict):
        for k in schema.get("required", ()):
            if k not in value:
                errs.append(f"{path}: missing '{k}'")
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                errs += check(value[k], sub, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errs += check(v, schema["items"], f"{path}[{i}]")
    return errs


def validate(doc: Any) -> list[str]:
    """Every schema violation of a ``fastmerge bench`` document ([] when it is valid)."""
    errs = check(doc, SCHEMA)
    if not isinstance(doc, dict) or doc.get("kind") not in ROW_SCHEMA or not isinstance(doc.get("results"), list):
        return errs
    if doc["kind"] == "kernels" and "copy" not in doc:
        errs.append("$: missing 'copy'")
    row = ROW_SCHEMA[doc["kind"]]
    for i, r in enumerate(doc["results"]):
        errs += check(r, row, f"$.results[{i}]")
        if doc["kind"] == "kernels" and isinstance(r, dict) and r.get("status") == "ok" and "time" not in r:
            errs.append(f"$.results[{i}]: status ok without 'time'")
    return errs


# ------------------------------------------------------------------------------------------------
# the table


def _f(x: Any, fmt: str, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "–"
    return format(x, fmt) + suffix


def _num(x: float, digits: int = 3) -> str:
    """``digits`` significant digits without exponents: 0.0532, 4.27, 27.9, 416, 14900."""
    if x >= 10 ** (digits - 1):
        return f"{round(x, digits - len(str(int(x)))):.0f}"
    return f"{x:.{digits}g}"


def _ms(r: dict) -> str:
    t = r["time"]
    return f"{_num(t['median_s'] * 1e3)} ± {_num((t['q3_s'] - t['q1_s']) * 1e3 / 2, 2)}"


def machine_line(m: dict) -> str:
    v = m["versions"]
    gpu = m.get("gpu")
    g = f"{gpu['name']} (driver {gpu.get('driver')}, CUDA {gpu.get('cuda')})" if gpu else "no GPU"
    return (f"{m['cpu_model']}, {m['cpu_count']} CPUs, {m.get('mem_total_gb')} GiB; {g}; python {v['python']}, "
            f"torch {v['torch']}, fastmerge {v['fastmerge']} (native: {v['native_cpu_ext']}), "
            f"mergekit {v.get('mergekit') or 'not installed'}; {m['date_utc']}")


def kernels_table(doc: dict) -> str:
    c = doc["copy"]
    lines = [
        f"machine: {machine_line(doc['machine'])}",
        f"copy bandwidth: {c['gbps']:.1f} GB/s ({c['buffer_bytes'] / 2**20:.0f} MiB `copy_`, bytes read + written, "
        f"median of {c['repeats']}, spread {100 * c['spread']:.1f} %)",
        "GB/s = physical-minimum bytes / median time: " + doc.get("byte_rule", "").replace("\n", " "),
        "",
        "| method | shape | T | dtype | backend | ms (median ± IQR/2) | GB/s | % of copy | vs torch | vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for r in doc["results"]:
        shape = "x".join(map(str, r["shape"]))
        if r["status"] != "ok":
            skipped.append(f"- {r['method']} {shape} T={r['models']} {r['dtype']} {r['backend']}: {r['status']}: {r.get('note', '')}")
            continue
        lines.append(
            f"| {r['method']} | {shape} | {r['models']} | {r['dtype']} | {r['backend']} | {_ms(r)} | "
            f"{_num(r['gbps'], 2) if r.get('gbps') is not None else '–'} | {_f(r.get('pct_of_copy'), '.0f', ' %')} | "
            f"{_f(r.get('speedup_vs_torch'), '.1f', '×')} | {_f(r.get('speedup_vs_mergekit'), '.1f', '×')} |")
    if skipped:
        lines += ["", "not timed:", *skipped]
    rules = doc.get("byte_rules") or {}
    if rules:
        lines += ["", "bytes per method (physical minimum):", *(f"- {k}: {v}" for k, v in rules.items())]
    return "\n".join(lines)


def merge_table(doc: dict) -> str:
    lines = [f"machine: {machine_line(doc['machine'])}", "",
             "| config | run | wall s (median ± IQR/2) | GB/s of input | vs floor | peak RSS MB | GPU peak MB "
             "| read s | compute s | write s | bound by |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        t = r["time"]
        st = r.get("stages") or {}
        lines.append(
            f"| {r['name']} | {r['what']} | {t['median_s']:.3f} ± {(t['q3_s'] - t['q1_s']) / 2:.3f} | {r['gbps_input']:.2f} | "
            f"{_f(r.get('vs_floor'), '.2f', '×')} | {_f(r.get('peak_rss_mb'), '.0f')} | {_f(r.get('gpu_peak_mb'), '.0f')} | "
            f"{_f(st.get('read_s'), '.3f')} | {_f(st.get('compute_s'), '.3f')} | {_f(st.get('write_s'), '.3f')} | "
            f"{st.get('bound_by', '–')} |")
    lines += ["", "floor: every input byte read once (pages populated) and the output written once through the same shard "
              "writer, no compute. read / compute / write: busy time of the read-ahead thread, the merge loop's "
              "backend calls and the writer thread (they overlap: the largest bounds the merge)."]
    return "\n".join(lines)


def table(doc: dict) -> str:
    return kernels_table(doc) if doc["kind"] == "kernels" else merge_table(doc)


# ------------------------------------------------------------------------------------------------
# the roofline chart


def plot(doc: dict, path: str) -> str:
    """Achieved GB/s against physical-minimum bytes, one mark per timed kernel, the copy bandwidth drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from None
    rows = [r for r in doc["results"] if r.get("status") == "ok" and r.get("gbps")]
    if not rows:
        raise RuntimeError("--plot: no timed kernel with a byte count to plot")
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    markers = "osD^v<>p*h"
    cmap = plt.get_cmap("tab10")
    for i, b in enumerate(backends):
        rs = [r for r in rows if r["backend"] == b]
        ax.scatter([r["bytes"] for r in rs], [r["gbps"] for r in rs], marker=markers[i % len(markers)],
                   color=cmap(i), label=b, s=42, zorder=3)
        for r in rs if b not in ("torch", "mergekit") else ():  # the baselines' labels would bury the kernels'
            ax.annotate(f"{r['method']} T{r['models']}", (r["bytes"], r["gbps"]), fontsize=6.5,
                        xytext=(4, 2), textcoords="offset points", color=cmap(i))
    cg = doc["copy"]["gbps"]
    ax.axhline(cg, color="black", linestyle="--", linewidth=1.2, zorder=2)
    ax.text(0.01, cg, f" copy {cg:.1f} GB/s", transform=ax.get_yaxis_transform(), va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("physical-minimum bytes moved per call")
    ax.set_ylabel("achieved GB/s (bytes / median time)")
    m = doc["machine"]
    where = m["gpu"]["name"] if m.get("gpu") and doc["settings"].get("device") == "cuda" else f"{m['cpu_model']}, {m['cpu_count']} CPUs"
    ax.set_title(f"fastmerge bench kernels: {where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
