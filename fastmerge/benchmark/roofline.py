"""The roofline: achieved GB/s against the copy bandwidth measured in the same run.

The copy bandwidth is ``dst.copy_(src)`` (``torch.Tensor.copy_``: a multi-threaded memcpy on CPU, a
device-to-device copy on a GPU) of a buffer larger than the last-level cache (CPU: 4x the L3, at least
256 MiB, 2x and 64 MiB at least with ``--quick``; GPU: 1 GiB), counted as bytes read + bytes written,
i.e. 2 x the buffer. A kernel's GB/s is its physical-minimum bytes (``benchmark.bytes``) / its median
time, and its roofline figure that GB/s as a percentage of the copy's: 100 % means the kernel moves
what it must as fast as this machine copies memory.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Callable

from .timing import Stats, measure


@dataclasses.dataclass(frozen=True)
class CopyBandwidth:
    nbytes: int  # the buffer (bytes moved per copy: 2x this)
    stats: Stats

    @property
    def gbps(self) -> float:
        return gbps(2 * self.nbytes, self.stats.median)

    def as_dict(self) -> dict:
        return {"buffer_bytes": self.nbytes, "bytes_moved": 2 * self.nbytes, "gbps": self.gbps, **self.stats.as_dict()}


def gbps(nbytes: int | float, seconds: float) -> float:
    """Bytes per second, in GB/s (1e9)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def pct_of_copy(achieved_gbps: float, copy_gbps: float) -> float:
    return 100.0 * achieved_gbps / copy_gbps if copy_gbps > 0 else float("nan")


def llc_bytes() -> int:
    """The largest CPU cache (Linux sysfs); 32 MiB when it cannot be read."""
    best = 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "size")) as f:
                s = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
        try:
            best = max(best, int(s.rstrip("KkMmGg")) * mult)
        except ValueError:
            pass
    return best or 32 << 20


def copy_buffer_bytes(device: str, quick: bool = False) -> int:
    if device == "cuda":
        return 1 << 30
    llc = llc_bytes()
    return max(2 * llc, 64 << 20) if quick else max(4 * llc, 256 << 20)


def copy_bandwidth(device: str, timer: Callable[[Callable[[], Any]], float], repeats: int = 10,
                   nbytes: int | None = None, quick: bool = False) -> CopyBandwidth:
    """Measure ``dst.copy_(src)`` of an ``nbytes`` buffer (default: ``copy_buffer_bytes``) on ``device``."""
    import torch

    n = nbytes or copy_buffer_bytes(device, quick)
    src = torch.ones(n, dtype=torch.uint8, device=device)  # written: pre-faulted
    dst = torch.zeros(n, dtype=torch.uint8, device=device)
    st = measure(lambda: dst.copy_(src), timer, repeats=repeats, warmup=2)
    return CopyBandwidth(n, st)
