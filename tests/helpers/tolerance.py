"""Comparison helpers: bit-for-bit tensor equality with a readable report, and a digest of a file or an
output folder. Accelerated paths are held to bit equality with the torch reference; where a test allows
a difference it states the bound itself (e.g. ``helpers.parity.assert_within_ulp``)."""

from __future__ import annotations

import torch


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality with a readable report (count, first index, values)."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
    iv = {4: torch.int32, 2: torch.int16, 8: torch.int64}[got.element_size()]
    a, b = got.reshape(-1).view(iv), want.reshape(-1).view(iv)
    diff = (a != b).nonzero()
    if diff.numel():
        i = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.numel()}/{a.numel()} elements differ; first at {i}: "
            f"got {float(got.reshape(-1)[i])!r}, want {float(want.reshape(-1)[i])!r}"
        )


def file_digest(path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    if Path(path).is_file():  # (rglob of a file yields nothing: every file would hash alike)
        h.update(Path(path).read_bytes())
        return h.hexdigest()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
