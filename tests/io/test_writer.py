"""ShardWriter: planned layout, streaming writes readable by safetensors, HF index, order checks."""

import json
import random

import pytest
import torch
from safetensors import safe_open

from fastmerge.errors import FastMergeError
from fastmerge.io.writer import ST_NAME, OutTensor, Shard, ShardWriter, parse_size, plan_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(10, 3, generator=g),
        "y": torch.randn(5, generator=g).bfloat16(),
        "z": torch.randn(7, 7, generator=g).half(),
        "big": torch.randn(100, generator=g),
    }


def _spec(ts):
    return [OutTensor(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in ts.items()]


def test_plan_shards_rule():
    ts = _spec(_tensors())  # sizes 120, 10, 98, 400 bytes
    shards = plan_shards(ts, 200)
    assert [[t.name for t in s.tensors] for s in shards] == [["x", "y"], ["z"], ["big"]]
    assert [s.filename for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan_shards(ts, 10**9)[0].filename == "model.safetensors"


def _greedy(sizes: list[int], limit: int) -> list[list[int]]:
    """The rule tensor by tensor: a shard takes the next tensor while its bytes stay within ``limit``."""
    groups: list[list[int]] = []
    size = 0
    for i, n in enumerate(sizes):
        if groups and size + n <= limit:
            groups[-1].append(i)
            size += n
        else:
            groups.append([i])
            size = n
    return groups


@pytest.mark.parametrize("seed", range(6))
def test_plan_shards_equals_the_rule_tensor_by_tensor(seed):
    """plan_shards (bisecting the running byte total) cuts exactly where the greedy rule does: empty tensors, tensors
    larger than a shard, shards filled to the byte, one shard for all."""
    rng = random.Random(seed)
    shapes = [(), (0,), (1,), (3, 5), (50,), (7, 7), (300,), (64, 64)]
    ts = [OutTensor(f"t{i}", rng.choice(sorted(ST_NAME)), rng.choice(shapes)) for i in range(rng.randint(1, 400))]
    sizes = [t.nbytes for t in ts]
    for limit in (1, 16, 200, 1000, sum(sizes), sum(sizes) - 1):
        want = _greedy(sizes, limit)
        got = [[int(t.name[1:]) for t in s.tensors] for s in plan_shards(ts, limit)]
        assert got == want, limit
    assert OutTensor("a", "bfloat16", (3, 5)).nbytes == 30 and OutTensor("a", "float32", ()).nbytes == 4
    assert OutTensor("a", "bfloat16", (3,)) == OutTensor("a", "bfloat16", (3,))


def test_round_trip_and_index(tmp_path):
    ts = _tensors()
    shards = plan_shards(_spec(ts), 200)
    w = ShardWriter(tmp_path, shards)
    for k, v in ts.items():
        w.write(k, v)
    w.finalize()
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    assert idx["weight_map"] == {"x": shards[0].filename, "y": shards[0].filename, "z": shards[1].filename, "big": shards[2].filename}
    for k, v in ts.items():
        with safe_open(str(tmp_path / idx["weight_map"][k]), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(k), v)


def test_single_shard_has_no_index(tmp_path):
    ts = _tensors()
    w = ShardWriter(tmp_path, plan_shards(_spec(ts), 10**9))
    for k, v in ts.items():
        w.write(k, v)
    w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_order_and_dtype_checked(tmp_path):
    ts = _tensors()
    w = ShardWriter(tmp_path, plan_shards(_spec(ts), 200))
    with pytest.raises(FastMergeError, match="expected tensor 'x'"):
        w.write("y", ts["y"])
    with pytest.raises(FastMergeError, match="planned"):
        w.write("x", ts["x"].double())
    w.write("x", ts["x"])
    with pytest.raises(FastMergeError, match="never written"):
        w.finalize()
    w.abort()


@pytest.mark.parametrize("text,val", [("5B", 5 * 10**9), ("500M", 5 * 10**8), ("1.5K", 1500), ("123", 123), (7, 7)])
def test_parse_size(text, val):
    assert parse_size(text) == val


def test_parse_size_bad():
    with pytest.raises(FastMergeError, match="--out-shard-size"):
        parse_size("lots")


def test_checksum_is_xxh64_and_incremental_like_the_reference(tmp_path):
    """The resume manifests' hash: XXH64 from _C (equal to the `xxhash` package's), the same value
    however the bytes are split, and the same from the file; crc32 where _C is missing."""
    import os

    from fastmerge import _native
    from fastmerge.io.checksum import Checksum, algorithm_of, file_checksum

    data = os.urandom(100_003)
    whole = Checksum()
    whole.update(data)
    parts = Checksum()
    for i in range(0, len(data), 977):
        parts.update(memoryview(data)[i:i + 977])
    assert whole.value() == parts.value()
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(tmp_path / "f", algorithm_of(whole.value()), chunk=4096) == whole.value()
    if _native.HAS_CPU_EXT:
        xxhash = pytest.importorskip("xxhash")
        assert whole.value() == f"xxh64:{xxhash.xxh64(data).intdigest():016x}"
    c = Checksum("crc32")
    c.update(data)
    import zlib

    assert c.value() == f"crc32:{zlib.crc32(data):08x}"
    flipped = bytearray(data)
    flipped[50_000] ^= 1
    (tmp_path / "g").write_bytes(bytes(flipped))
    assert file_checksum(tmp_path / "g", algorithm_of(whole.value())) != whole.value()


def _header_by_json(shard: Shard) -> bytes:
    """The safetensors header as a dict dumped by json (what the text builder must equal byte for byte)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("names", [
    ["model.embed_tokens.weight", "model.layers.0.mlp.experts.17.up_proj.weight", "x y", "~!#[]"],
    ['quote"d', "back\\slash", "unicod\u00e9", "\u4e2d\u6587", "tab\tname", "del\x7f", "emoji\U0001f600", "plain"],
])
def test_header_text_equals_json_dump(names):
    rng = random.Random(len(names))
    ts = [OutTensor(n, rng.choice(sorted(ST_NAME)), tuple(rng.randint(0, 7) for _ in range(rng.randint(0, 3)))) for n in names]
    shard = Shard("model.safetensors", ts)
    assert shard._header_bytes() == _header_by_json(shard)
    assert json.loads(shard._header_bytes()[8:])["__metadata__"] == {"format": "pt"}


@pytest.mark.parametrize("native", [True, False])
def test_header_entries_native_and_python_equal_json_dump(native, monkeypatch):
    """The header written by ``_C.safetensors_header`` and by the Python rows (``_entries``) both equal
    json.dumps of the header, byte for byte: shapes shared in runs and alternating, empty shapes, dimensions and
    offsets past 2^32, every dtype; the native writer declines a name that needs an escape (one among thousands),
    and the Python rows then write the shard."""
    from fastmerge import _native
    from fastmerge.io import writer

    if native:
        if not _native.HAS_CPU_EXT:
            pytest.skip("needs the native extension")
        assert writer._NATIVE_HEADER is not None  # the native path, not the fallback, is what runs
    else:
        monkeypatch.setattr(writer, "_NATIVE_HEADER", None)
    rng = random.Random(7)
    shared = [(32, 64), (64, 32), (), (1 << 33, 3), (5,)]
    ts = []
    for i in range(3000):
        sh = shared[(i // 7) % len(shared)] if i % 11 else tuple(rng.randint(0, 9) for _ in range(rng.randint(0, 4)))
        ts.append(OutTensor(f"model.layers.{i // 100}.mlp.experts.{i}.w{i % 3}.weight", rng.choice(sorted(ST_NAME)), sh))
    shard = Shard("model.safetensors", ts)
    assert shard._header_bytes() == _header_by_json(shard)
    ts[1234] = OutTensor('odd "name" \\ \u00e9', "bfloat16", (3,))
    if native:
        assert writer._NATIVE_HEADER(ts, writer.ST_NAME, writer._HEAD) is None
    shard = Shard("model.safetensors", ts)
    assert shard._header_bytes() == _header_by_json(shard)


def test_native_header_of_no_rows_and_of_rows_it_declines():
    """``_C.safetensors_header``: a shard of no tensors is the JSON dump's header too; rows that are not all of the
    first row's slotted class, or a dtype it has no safetensors name for, are declined (None), never written wrong."""
    from fastmerge import _native
    from fastmerge.io import writer

    if not _native.HAS_CPU_EXT:
        pytest.skip("needs the native extension")
    assert writer._NATIVE_HEADER([], writer.ST_NAME, writer._HEAD) == _header_by_json(Shard("model.safetensors", []))
    ts = [OutTensor("a", "bfloat16", (2, 3)), OutTensor("b", "float32", (4,))]
    assert writer._NATIVE_HEADER(ts, writer.ST_NAME, writer._HEAD) == _header_by_json(Shard("model.safetensors", ts))

    class Other:
        name, dtype, shape, nbytes = "c", "bfloat16", (1,), 2

    assert writer._NATIVE_HEADER([*ts, Other()], writer.ST_NAME, writer._HEAD) is None
    assert writer._NATIVE_HEADER(ts, {"float32": "F32"}, writer._HEAD) is None  # no name for bfloat16
