"""Opening a checkpoint of 20k small tensors: the native safetensors header parse against the Python one.

    python bench/bench_st_header.py [--root DIR] [--repeat 7] [--merge]

On ``bench_moe.py``'s ``moe-small`` base model (DeepSeek-V3-shaped, 20,347 tensors, one 2.4 MB header;
generated under ``--root`` as ``bench_moe.py`` does, or reused), interleaved and alternating which goes
first, median of ``--repeat`` rounds:

- ``CheckpointIndex.open`` with ``_C.parse_safetensors_header`` (the default) and with the Python parse alone
  (``io.index._NATIVE_PARSE = None``), wall and CPU time of this process;
- the parse of the header bytes alone (file already read): native, Python (``json.loads`` + the checks and
  TensorInfo loop of ``io.index._parse_header``), the Python one with the cyclic collector paused (the native
  parse pauses it while it builds its objects: about half the Python parse's time is collections), and
  ``json.loads`` by itself for scale;
- ``--merge``: also a linear merge of the family (base + 2, native engine, ``bench_moe.py``'s config: three
  headers opened), each way, wall and CPU time.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path

from bench_moe import SMALL, config, family, run_fastmerge

from fastmerge.io import index
from fastmerge.io.index import ITEMSIZE, ST_DTYPES, CheckpointIndex, TensorInfo


def gc_paused(fn):
    def run():
        gc.disable()
        try:
            fn()
        finally:
            gc.enable()
    return run


def timed(fn) -> tuple[float, float]:
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "fastmerge-moe"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--merge", action="store_true")
    a = ap.parse_args()
    native = index._NATIVE_PARSE
    if native is None:
        raise SystemExit("fastmerge._C has no parse_safetensors_header (not built?)")
    base, fts = family(Path(a.root), "moe-small", SMALL)
    f = base / "model.safetensors"
    blob = f.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw, size = blob[8:8 + n], len(blob)
    ck = CheckpointIndex.open(base)
    print(f"{f}: {len(ck.tensors)} tensors, header {n / 1e6:.2f} MB; median of {a.repeat}, interleaved", flush=True)

    def open_with(parse):
        def run():
            index._NATIVE_PARSE = parse
            try:
                CheckpointIndex.open(base)
            finally:
                index._NATIVE_PARSE = native
        return run

    cases = {
        "open, native": open_with(native),
        "open, Python": open_with(None),
        "parse, native": lambda: native(raw, 8 + n, size, f, TensorInfo, ST_DTYPES, ITEMSIZE),
        "parse, Python": lambda: index._parse_header(f, raw, 8 + n, size),
        "parse, Python, GC paused": gc_paused(lambda: index._parse_header(f, raw, 8 + n, size)),
        "json.loads alone": lambda: index.json.loads(raw),
    }
    if a.merge:
        cfg = config("linear", base, fts)

        def merge_with(parse):
            def run():
                index._NATIVE_PARSE = parse
                try:
                    wall, _, cpu, _, _ = run_fastmerge(cfg, "native", 1)
                finally:
                    index._NATIVE_PARSE = native
                return wall, cpu
            return run

        cases |= {"merge, native": merge_with(native), "merge, Python": merge_with(None)}
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for r in range(a.repeat):
        for k in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            res[k].append(cases[k]() if k.startswith("merge") else timed(cases[k]))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in res.items()}
    for k, (w, c) in med.items():
        print(f"{k:26s} wall {w * 1e3:8.1f} ms   CPU {c * 1e3:8.1f} ms", flush=True)
    for what in ("open", "parse") + (("merge",) if a.merge else ()):
        (wn, cn), (wp, cp) = med[f"{what}, native"], med[f"{what}, Python"]
        print(f"{what}: Python / native {wp / wn:.1f}x wall, {cp / cn:.1f}x CPU", flush=True)


if __name__ == "__main__":
    main()
