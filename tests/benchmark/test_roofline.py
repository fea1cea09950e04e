"""Timing statistics and the roofline math with an injected clock."""

from __future__ import annotations

import pytest

from fastmerge.benchmark import roofline
from fastmerge.benchmark.timing import CpuTimer, Stats, measure


class FakeClock:
    """Each call returns the next reading: a timed call lasts the difference of two readings."""

    def __init__(self, durations):
        t, self.readings = 0.0, []
        for d in durations:
            self.readings += [t, t + d]
            t += d + 1.0
        self.it = iter(self.readings)

    def __call__(self) -> float:
        return next(self.it)


def test_cpu_timer_reads_the_injected_clock():
    calls = []
    timer = CpuTimer(clock=FakeClock([0.25, 0.5]))
    assert timer(lambda: calls.append(1)) == 0.25
    assert timer(lambda: calls.append(1)) == 0.5
    assert len(calls) == 2


def test_measure_stats():
    st = measure(lambda: None, CpuTimer(clock=FakeClock([4, 1, 3, 2, 5])), repeats=5, warmup=2)
    assert st.times == (4, 1, 3, 2, 5)
    assert st.median == 3
    assert (st.q1, st.q3) == (2, 4)  # linear interpolation: numpy's default
    assert st.spread == pytest.approx(2 / 3)
    d = st.as_dict()
    assert d["min_s"] == 1 and d["max_s"] == 5 and d["repeats"] == 5


def test_measure_stops_after_max_seconds_with_min_repeats():
    st = measure(lambda: None, CpuTimer(clock=FakeClock([2.0] * 10)), repeats=10, warmup=0, max_seconds=3.0)
    assert len(st.times) == 3  # 3 >= min_repeats and 6 s >= 3 s


def test_copy_bandwidth_and_percent_with_a_fake_clock():
    # a 1 MiB copy that "takes" 1 ms moves 2 MiB (read + write): 2.097152 GB/s
    clock = FakeClock([0.001] * 5 + [0.002] * 0)
    cb = roofline.copy_bandwidth("cpu", CpuTimer(clock=clock), repeats=3, nbytes=1 << 20)
    assert cb.gbps == pytest.approx(2 * (1 << 20) / 0.001 / 1e9)
    assert cb.as_dict()["bytes_moved"] == 2 << 20
    # a kernel that must move 1e9 bytes in 0.5 s: 2 GB/s, 95.4 % of that copy
    k = roofline.gbps(1e9, 0.5)
    assert k == 2.0
    assert roofline.pct_of_copy(k, cb.gbps) == pytest.approx(100 * 2.0 / 2.097152)


def test_copy_buffer_exceeds_the_last_level_cache():
    llc = roofline.llc_bytes()
    assert roofline.copy_buffer_bytes("cpu") >= 4 * llc
    assert roofline.copy_buffer_bytes("cpu", quick=True) >= 2 * llc


def test_stats_single_run():
    s = Stats((0.5,))
    assert (s.median, s.q1, s.q3, s.spread) == (0.5, 0.5, 0.5, 0.0)
