"""Faults and counters the engine tests inject with pytest's monkeypatch."""

from __future__ import annotations

import errno


def count_readers(monkeypatch):
    """Every ModelReader opened from now on, and the ones closed: (opened ids, closed ids)."""
    from fastmerge.io import reader as reader_mod

    opened, closed = [], []
    init, close = reader_mod.ModelReader.__init__, reader_mod.ModelReader.close

    def counting_init(self, *a, **k):
        init(self, *a, **k)
        opened.append(id(self))

    def counting_close(self):
        closed.append(id(self))
        close(self)

    monkeypatch.setattr(reader_mod.ModelReader, "__init__", counting_init)
    monkeypatch.setattr(reader_mod.ModelReader, "close", counting_close)
    return opened, closed


def disk_full_on_write(monkeypatch, at: int) -> None:
    """The write of the ``at``-th tensor written by any ShardWriter fails with ENOSPC, as a full disk would
    (``ShardWriter._append``: every write of tensor bytes, one tensor or a run of small ones)."""
    from fastmerge.io import writer as writer_mod

    append, calls = writer_mod.ShardWriter._append, [0]

    def failing(self, si, data, count):
        calls[0] += count
        if calls[0] >= at > calls[0] - count:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / "model.safetensors"))
        append(self, si, data, count)

    monkeypatch.setattr(writer_mod.ShardWriter, "_append", failing)
