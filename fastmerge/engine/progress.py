"""The merge's progress: a tqdm bar on a terminal (one rate, in the bar's unit: MB/s of input), and in a
log (stderr not a terminal: a file, a pipe, a CI log) a plain line every ``LOG_EVERY_S`` seconds instead
of a bar redrawn with carriage returns."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

#: seconds between two progress lines outside a terminal
LOG_EVERY_S = 5.0


def _size(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f} {unit}"
    for suffix, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


class LineProgress:
    """tqdm's ``update``/``close``/``n``/``unit`` as a line every ``every`` seconds (and one at the end)."""

    def __init__(self, total: int, unit: str, desc: str, file: TextIO, every: float = LOG_EVERY_S):
        self.total, self.unit, self.desc, self.file, self.every = total, unit, desc, file, every
        self.n = 0
        self._t0 = self._last = time.perf_counter()
        self._closed = False

    def _line(self, now: float) -> None:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        rate = self.n / max(now - self._t0, 1e-9)
        print(f"{self.desc}: {_size(self.n, self.unit)} / {_size(self.total, self.unit)} ({pct:.0f}%), "
              f"{_size(rate, self.unit)}/s, {now - self._t0:.0f} s", file=self.file, flush=True)

    def update(self, n: int) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._line(now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n and time.perf_counter() - self._t0 >= self.every:  # a short merge: the summary says it all
                self._line(time.perf_counter())


def make_progress(total: int, unit: str, desc: str, file: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal, else a ``LineProgress``."""
    file = file or sys.stderr
    isatty = getattr(file, "isatty", None)
    if not (isatty and isatty()):
        return LineProgress(total, unit, desc, file)
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1000, desc=desc, file=file)
