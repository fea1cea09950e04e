"""FP8 inputs in the native kernels: one tensor, three ways, measured side by side (interleaved, median).

    python bench/bench_fp8.py [--shape 4096x4096] [--models 3] [--repeat 5] [--threads 1] [--methods load,ties,linear,dare_ties]
        [--format float8_e4m3fn|float8_e5m2]

Inputs: a base and ``--models`` fine-tunes quantised to F8_E4M3 (``--format``) with DeepSeek-V3's 128x128 block scales
(``io.fp8.quantize_blocks``), bf16 output. Per method:

- ``fp8``: the kernel reads the FP8 bytes and scales (``_native.Fp8Source``; the native engine's path);
- ``fp32 copies``: the same kernel on the inputs' fp32 dequantisations made beforehand (4 bytes per element);
- ``torch dequant``: ``io.fp8.dequantize`` of every input, then the kernel (the torch engine's path).

The three are bit-identical (tests/native/test_fp8_native.py); this measures what the load step costs.
``load``: the load step nearly alone, ``weighted_delta_sum`` of one input (weight 1, fp32 output) read as FP8
(decode and scale), as bf16 (a widening) and as fp32.

Prints the ``_C`` it loaded: to compare two builds, run this once per side with ``PYTHONPATH`` naming a folder
that holds a ``fastmerge/`` package with that ``_C`` (and a sitecustomize.py that drops the editable install's
finder from ``sys.meta_path``, as bench/native_pertensor_ab.py does), alternating the sides.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from fastmerge import _native
from fastmerge.io import fp8


def source(q: torch.Tensor, s: torch.Tensor) -> _native.Fp8Source:
    return _native.Fp8Source(q.view(torch.uint8).data_ptr(), q.numel(), str(q.dtype).split(".")[1], q.shape, "block", s.data_ptr(),
                             s.numel(), (128, 128), keep=(q, s))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="load,ties,linear,dare_ties")
    ap.add_argument("--format", default="float8_e4m3fn", choices=["float8_e4m3fn", "float8_e5m2"])
    a = ap.parse_args()
    shape = tuple(int(x) for x in a.shape.split("x"))
    T, th = a.models, a.threads
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 0.02
    qs = [fp8.quantize_blocks(x, dtype=a.format) for x in [base] + [base + torch.randn(shape, generator=g) * 0.002 for _ in range(T)]]
    srcs = [source(q, s) for q, s in qs]
    copies = [fp8.dequantize(q, s, "block") for q, s in qs]
    out = torch.empty(shape, dtype=torch.bfloat16)
    w, d = [0.5] * T, [0.5] * T
    one = torch.empty(shape)
    kernels = {
        "load": lambda ins: _native.weighted_delta_sum(one, ins[:1], None, [1.0], None, threads=th),
        "ties": lambda ins: _native.ties(out, ins[1:], ins[0], w, d, True, threads=th),
        "linear": lambda ins: _native.weighted_delta_sum(out, ins[1:], None, w, None, threads=th),
        "dare_ties": lambda ins: _native.dare(out, ins[1:], ins[0], w, d, "sum", True, 1.0, True, 1, 2, threads=th),
    }
    bf16 = [copies[0].to(torch.bfloat16)]
    print(f"_C: {_native._C.__file__}; torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{a.shape}, base + {T} models, {a.format} 128x128 blocks -> bf16, threads={th}, median of {a.repeat} (interleaved)")
    for m in a.methods.split(","):
        fn = kernels[m]
        if m == "load":
            ways = {"fp8": lambda: fn(srcs), "bf16": lambda: fn(bf16), "fp32": lambda: fn(copies)}
        else:
            ways = {"fp8": lambda: fn(srcs), "fp32 copies": lambda: fn(copies),
                    "torch dequant": lambda: fn([fp8.dequantize(q, s, "block") for q, s in qs])}
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(a.repeat):
            for k, run in ways.items():
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        if m == "load":
            print(f"{m:10s} " + "  ".join(f"{k}: {v * 1e3:7.1f} ms" for k, v in med.items())
                  + f"  | fp8 / bf16 {med['fp8'] / med['bf16']:.2f}x, fp8 / fp32 {med['fp8'] / med['fp32']:.2f}x", flush=True)
            continue
        print(f"{m:10s} " + "  ".join(f"{k}: {v * 1e3:7.1f} ms" for k, v in med.items())
              + f"  | fp8 / fp32 copies {med['fp8'] / med['fp32 copies']:.2f}x, torch dequant / fp8 "
                f"{med['torch dequant'] / med['fp8']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
