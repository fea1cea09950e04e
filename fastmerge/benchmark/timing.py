"""Timers and the statistics of repeated timings.

CPU: ``perf_counter`` around one call, on buffers that were written before (pre-faulted: no page faults
are timed) and after an untimed warm-up call. CUDA: a pair of CUDA events around one call, after an
untimed write of a buffer twice the size of the L2 cache (so the inputs do not start in L2), with the
device synchronised after each call. The clock is injectable (``CpuTimer(clock=...)``) for tests.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Stats:
    """Seconds of repeated calls: the median and the spread (the interquartile range)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def q1(self) -> float:
        return _quantile(self.times, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.times, 0.75)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05: the middle half of the runs lie within 5 %)."""
        m = self.median
        return (self.q3 - self.q1) / m if m > 0 else 0.0

    def as_dict(self) -> dict:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "min_s": min(self.times),
                "max_s": max(self.times), "spread": self.spread, "repeats": len(self.times),
                "times_s": list(self.times)}


def _quantile(xs: tuple[float, ...] | list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) without numpy."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class CpuTimer:
    """Wall-clock seconds of one call (``clock``: ``time.perf_counter`` unless a test injects one)."""

    kind = "cpu perf_counter"

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock

    def __call__(self, fn: Callable[[], Any]) -> float:
        t0 = self.clock()
        fn()
        return self.clock() - t0


class CudaTimer:
    """CUDA-event seconds of one call, after flushing the L2 cache (an untimed write of 2x its size)."""

    kind = "cuda events + L2 flush"

    def __init__(self, device: Any = None):
        import torch

        self.torch = torch
        props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
        l2 = int(getattr(props, "L2_cache_size", 0) or 64 << 20)
        self.flush_buf = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], Any]) -> float:
        torch = self.torch
        self.flush_buf.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3


def measure(fn: Callable[[], Any], timer: Callable[[Callable[[], Any]], float], repeats: int, warmup: int = 1,
            max_seconds: float | None = None, min_repeats: int = 3) -> Stats:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls. With ``max_seconds``, stop once the timed
    calls add up to that much and at least ``min_repeats`` were made (slow baselines); a call whose warm-up
    alone took longer than ``max_seconds`` is timed twice only (a 30 s reference is not timed 3 more times)."""
    for i in range(warmup):
        if i == 0 and max_seconds is not None:
            if timer(fn) > max_seconds:
                repeats, min_repeats = min(repeats, 2), min(min_repeats, 2)
        else:
            fn()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        times.append(timer(fn))
        if max_seconds is not None and len(times) >= min_repeats and sum(times) >= max_seconds:
            break
    return Stats(tuple(times))
