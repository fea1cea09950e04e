"""SIGTERM and SIGHUP handled like Ctrl-C for the duration of a merge.

A merge stopped by ``kill`` (SIGTERM: a scheduler's time limit, ``docker stop``) or by its terminal
closing (SIGHUP) used to die on the spot and leave its temporary folder ``.OUT.fastmerge-tmp-*`` beside
OUT. Inside ``terminate_as_interrupt()`` those signals raise ``Terminated`` (a ``KeyboardInterrupt``) in
the main thread instead, so the ``Session`` unwinds exactly as it does for Ctrl-C: writer drained,
readers closed, temporary folder removed (or, for a resumable merge, kept for ``--resume``). The previous
handlers are restored after; a signal the process ignores (``nohup``: SIGHUP) stays ignored; outside the
main thread nothing is installed (Python delivers signals to the main thread only). SIGKILL cannot be
handled: ``io.outdir.stale_temp_dirs`` finds what it leaves.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

#: the signals turned into ``Terminated`` (SIGHUP does not exist on Windows)
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """A merge stopped by a signal (``signum``); unwinds like Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


#: the signal that stopped the last merge (an engine may re-raise a plain KeyboardInterrupt: the CLI reads this)
_received: int | None = None


def received() -> int | None:
    """The signal that stopped the current (or last) merge inside ``terminate_as_interrupt``; None: none did."""
    return _received


def _raise(signum: int, frame: Any) -> None:
    global _received
    _received = signum
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt(signums: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _received
    _received = None
    saved: dict[int, Any] = {}
    try:
        for s in signums:
            prev = signal.getsignal(s)
            if prev is signal.SIG_IGN:
                continue  # nohup's SIGHUP: the user asked to survive it
            saved[s] = signal.signal(s, _raise)
        yield
    finally:
        for s, prev in saved.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
