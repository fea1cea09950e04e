"""The fast hash of an output shard's bytes, recorded in the resume manifests and checked on ``--resume``.

XXH64 from the C++ extension (~10 GB/s on one core) where ``_C`` is loaded, else ``zlib.crc32``
(~3.7 GB/s): the hash runs on the writer thread, which shares the cores with the kernels, and
crc32 there made a linear merge of the benchmark family 25 % slower on 2 cores. The algorithm is
part of the recorded value ("xxh64:…", "crc32:…"), so a manifest is checked with the hash it was
written with."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from .. import _native


class Checksum:
    """Incremental hash of bytes (``update`` with flat buffers); ``value()`` is "<algorithm>:<hex>"."""

    def __init__(self, algorithm: str | None = None):
        if algorithm is None:
            algorithm = "xxh64" if _native.HAS_CPU_EXT else "crc32"
        if algorithm not in ("xxh64", "crc32"):
            raise ValueError(f"unknown checksum algorithm '{algorithm}'")
        if algorithm == "xxh64" and not _native.HAS_CPU_EXT:
            raise ValueError("xxh64 needs fastmerge._C (not loaded)")
        self.algorithm = algorithm
        self._h: Any = _native._cpu_ext().Xxh64() if algorithm == "xxh64" else None
        self._crc = 0

    def update(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        if self._h is not None:
            self._h.update(mv)  # the GIL is released inside
        else:
            self._crc = zlib.crc32(mv, self._crc)

    def value(self) -> str:
        if self._h is not None:
            return f"xxh64:{self._h.digest():016x}"
        return f"crc32:{self._crc:08x}"


def algorithm_of(value: Any) -> str | None:
    """The algorithm a recorded value was made with (None: not a value of this module)."""
    if isinstance(value, str) and ":" in value and value.split(":", 1)[0] in ("xxh64", "crc32"):
        return value.split(":", 1)[0]
    return None


def file_checksum(path: Path, algorithm: str, chunk: int = 16 << 20) -> str:
    """``Checksum(algorithm)`` of a whole file, read in ``chunk``-byte pieces."""
    c = Checksum(algorithm)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                return c.value()
            c.update(view[:n])
