"""fastmerge.lora.st_numpy: numpy's reading (bf16/f16/f32 -> fp32) and rounding (fp32 -> bf16/f16) bit for bit
against torch's, every bf16 bit pattern and the rounding's edge cases; the mapped reader on a file that
safetensors wrote."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastmerge.errors import CheckpointError
from fastmerge.io.index import CheckpointIndex
from fastmerge.lora.st_numpy import Reader, from_f32, promote, to_f32

DTYPES = ["float32", "float16", "bfloat16"]


def _edge_f32() -> np.ndarray:
    """fp32 values whose rounding to bf16/f16 is delicate: halfway cases with even and odd kept bits, the
    largest finite values and just above them, subnormals of both targets, ±0, ±inf, NaNs of both signs,
    quiet and signalling with payloads; then random normal values of many magnitudes."""
    bits = []
    for hi in (0x3F80, 0x3F81, 0x7F7F, 0x477F, 0x0001, 0x8001, 0x3380, 0x3381):  # 1.0, odd lsb, max, f16 max, tiny
        bits += [hi << 16 | lo for lo in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]
    bits += [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,
             0x7FC12345, 0xFFBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001]
    rng = np.random.default_rng(0)
    rand = (rng.standard_normal(20000) * np.exp2(rng.integers(-30, 30, 20000))).astype(np.float32)
    return np.concatenate([np.array(bits, dtype=np.uint32).view(np.float32), rand])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_rounding_from_f32_is_torchs_bit_for_bit(dtype):
    x = _edge_f32()
    with np.errstate(over="ignore", invalid="ignore"):
        got = from_f32(x, dtype)
    want = torch.from_numpy(x).to(getattr(torch, dtype))
    bits = {"bfloat16": torch.int16, "float16": torch.int16, "float32": torch.int32}[dtype]
    want_bits = want.view(bits).numpy().view(np.uint16 if bits == torch.int16 else np.uint32)
    got_bits = got.view(np.uint16 if bits == torch.int16 else np.uint32)
    bad = np.flatnonzero(got_bits != want_bits)
    assert bad.size == 0, [(hex(int(x.view(np.uint32)[i])), hex(int(got_bits[i])), hex(int(want_bits[i]))) for i in bad[:5]]
    # non-contiguous input (a transposed factor): same bits as its contiguous copy
    m = x[:20000].reshape(100, 200).T
    np.testing.assert_array_equal(from_f32(m, dtype).view(got_bits.dtype), from_f32(np.ascontiguousarray(m), dtype).view(got_bits.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_f32_is_torchs_float_every_bit_pattern(dtype):
    if dtype == "float32":
        raw = _edge_f32()
        want = raw
    else:
        raw = np.arange(1 << 16, dtype=np.uint16)  # every bf16 / f16 bit pattern, NaN payloads included
        want = torch.from_numpy(raw.view(np.int16)).view(getattr(torch, dtype)).float().numpy()
        raw = raw if dtype == "bfloat16" else raw.view(np.float16)
    out = np.full(raw.shape, 7.0, dtype=np.float32)
    to_f32(raw, dtype, out)
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    # into a transposed (strided) destination, as extraction writes an embedding's transpose
    out2 = np.full((raw.size // 16, 16), 7.0, dtype=np.float32).T
    to_f32(raw.reshape(16, -1), dtype, out2)
    np.testing.assert_array_equal(out2.view(np.uint32), want.reshape(16, -1).view(np.uint32))


def test_promote_is_torchs():
    for a in DTYPES:
        for b in DTYPES:
            assert promote(a, b) == str(torch.promote_types(getattr(torch, a), getattr(torch, b))).removeprefix("torch."), (a, b)


def test_reader_reads_what_safetensors_wrote_and_refuses_a_short_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g).half(),
               "c": torch.randn(2, 3, 4, generator=g), "d": torch.empty(0, 4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    idx = CheckpointIndex.open(tmp_path)
    r = Reader()
    for name, t in tensors.items():
        np.testing.assert_array_equal(r.f32(idx.tensors[name]), t.float().numpy())
    r.close()
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # the last tensor's bytes cut short after the header was read
    with pytest.raises(CheckpointError, match="past the end"):
        Reader().f32(max(idx.tensors.values(), key=lambda i: i.end))
