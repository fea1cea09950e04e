"""The native safetensors header parse (``_C.parse_safetensors_header``) against the Python one (``_parse_header``).

Valid headers: the same metadata and TensorInfo objects (every field, its type, the order, the one path
object, one shape tuple per (dtype, shape)). Malformed ones: the native parse declines and
``CheckpointIndex.open`` raises the Python parse's message. And the native parse is what runs on a normal file.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import struct
from pathlib import Path

import pytest

from fastmerge import _native
from fastmerge.errors import CheckpointError
from fastmerge.io import index
from fastmerge.io.index import ITEMSIZE, ST_DTYPES, CheckpointIndex, TensorInfo
from fastmerge.testing import DeepSeekV3Shape, LlamaShape, Qwen3MoeShape, make_family

needs_native = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}")

DEEPSEEK = DeepSeekV3Shape(hidden=32, layers=3, first_k_dense=1, intermediate=48, moe_intermediate=16, experts=8,
                           heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope=8, qk_rope=8, v_head=8, vocab=96)
QWEN = Qwen3MoeShape(hidden=32, layers=2, moe_intermediate=16, experts=8, heads=2, kv_heads=1, head_dim=16, vocab=96)
LLAMA = LlamaShape(hidden=32, layers=2, intermediate=48, vocab=64, heads=2)


def _write(path: Path, header: str | bytes, data: int) -> Path:
    """A safetensors file: the 8-byte length, ``header`` as given, ``data`` bytes of tensor data."""
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x5a" * data)
    return path


def _native_parse(path: Path):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return index._NATIVE_PARSE(blob[8:8 + n], 8 + n, len(blob), path, TensorInfo, ST_DTYPES, ITEMSIZE)


def _parse_both(path: Path):
    """(native result, Python result) of one file's header."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return _native_parse(path), index._parse_header(path, blob[8:8 + n], 8 + n, len(blob))


def _assert_same(path: Path) -> list[TensorInfo]:
    native, (meta, infos) = _parse_both(path)
    assert native is not None, f"{path.name}: the native parse declined a valid header"
    nmeta, ninfos, nby_name = native
    assert type(nmeta) is dict and nmeta == meta
    # the table by name: the same row objects, in file order
    assert type(nby_name) is dict and list(nby_name) == [t.name for t in ninfos]
    assert all(a is b for a, b in zip(nby_name.values(), ninfos))
    assert [t.name for t in ninfos] == [t.name for t in infos]
    shapes: dict = {}
    for a, b in zip(ninfos, infos):
        assert type(a) is TensorInfo and a == b
        for f in dataclasses.fields(TensorInfo):  # every slot written (an unset one raises), each the same value
            assert getattr(a, f.name) == getattr(b, f.name), f.name
        assert a.file is path and a.dtype is b.dtype  # the caller's path, ST_DTYPES' own str
        assert type(a.name) is str and type(a.begin) is int and type(a.end) is int
        assert type(a.shape) is tuple and all(type(d) is int for d in a.shape)
        assert shapes.setdefault((a.dtype, a.shape), a.shape) is a.shape  # one tuple per (dtype, shape)
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.name = "x"  # type: ignore[misc]
    return ninfos


@needs_native
@pytest.mark.parametrize("shape,fp8", [(LLAMA, None), (DEEPSEEK, None), (QWEN, None), (DEEPSEEK, (8, 8))],
                         ids=["llama", "deepseek-v3", "qwen3-moe", "deepseek-v3-fp8"])
def test_families_equal(tmp_path, shape, fp8):
    base, _ = make_family(tmp_path, shape, n_finetunes=0, shard_bytes=20_000, fp8_block=fp8)
    files = sorted(base.glob("*.safetensors"))
    assert len(files) > 1
    seen = set()
    for f in files:
        seen |= {t.dtype for t in _assert_same(f)}
    if fp8:
        assert {"float8_e4m3fn", "float32"} <= seen


def _entry(dtype: str, shape: list[int], b: int, e: int, order=("dtype", "shape", "data_offsets")) -> dict:
    vals = {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}
    return {k: vals[k] for k in order}


def _layout(specs: list[tuple[str, str, list[int]]]) -> tuple[dict, int]:
    """Header entries back to back in the given order, and the data size."""
    out, pos = {}, 0
    for name, st, shape in specs:
        n = ITEMSIZE[ST_DTYPES[st]]
        for d in shape:
            n *= d
        out[name] = _entry(st, shape, pos, pos + n)
        pos += n
    return out, pos


@needs_native
def test_every_dtype_zero_size_and_0d(tmp_path):
    specs = [(f"t.{st}.{k}", st, shape) for k, shape in enumerate([[3, 5], [], [0, 7], [2, 1, 3]]) for st in ST_DTYPES]
    specs += [("z.a", "F16", [0]), ("z.b", "BF16", [4, 0])]  # several zero-size tensors at one offset
    header, size = _layout(specs)
    header["__metadata__"] = {"format": "pt"}
    infos = _assert_same(_write(tmp_path / "m.safetensors", json.dumps(header), size))
    assert {t.dtype for t in infos} == set(ST_DTYPES.values())
    assert any(t.shape == () for t in infos) and any(t.begin == t.end for t in infos)


@needs_native
def test_offsets_out_of_name_order(tmp_path):
    header, size = _layout([("c", "F32", [4]), ("a", "BF16", [3, 3]), ("b", "F8_E5M2", [5])])
    rev = dict(reversed(list(header.items())))  # header order != file order: sorted by offset
    infos = _assert_same(_write(tmp_path / "m.safetensors", json.dumps(rev), size))
    assert [t.name for t in infos] == ["c", "a", "b"]


ODD_NAMES = ['quo\\"te', "back\\\\slash", "sl\\/ash", "ctl\\b\\f\\n\\r\\t", "\\u00e9t\\u00E9", "\\u4e2d\\u6587",
             "emoji\\ud83d\\ude00", "nul\\u0000byte", "raw \u00e9\u4e2d\U0001f600", "\\u005f_escaped_ascii"]


@needs_native
def test_escapes_unicode_key_order_and_whitespace(tmp_path):
    orders = [("dtype", "shape", "data_offsets"), ("data_offsets", "dtype", "shape"), ("shape", "data_offsets", "dtype")]
    parts, pos = [], 0
    for k, name in enumerate(ODD_NAMES):
        e = _entry("BF16", [2, k + 1], pos, pos + 4 * (k + 1), orders[k % 3])
        pos += 4 * (k + 1)
        body = " ,\n\t ".join(f'\r"{key}" \t:\n {json.dumps(v).replace(",", " ,  ")}' for key, v in e.items())
        parts.append(f' \n"{name}"\t :  {{ {body}\r\n}}  ')
    meta = '"__metadata__" : { "format" :"pt", "n\\u00e4me\\n" : "v\\u00e4lue \\ud83d\\ude00" }'
    text = "\t\r\n {" + ",".join(parts[:3] + [meta] + parts[3:]) + "} \n\t "
    infos = _assert_same(_write(tmp_path / "m.safetensors", text, pos))
    assert [t.name for t in infos] == [json.loads(f'"{n}"') for n in ODD_NAMES]
    assert infos[0].name == 'quo"te' and infos[6].name == "emoji\U0001f600"


@needs_native
@pytest.mark.parametrize("text,size", [
    ("{}", 0),
    (' {"__metadata__": {}} ', 0),
    ('{"\\u005f_metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": "b", "c": "d"}}', 4),
    ('{"a": {"dtype": "F32", "shape": [0, 100000000000], "data_offsets": [0, 0]},'
     ' "b": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', 0),
], ids=["empty", "empty-metadata", "escaped-metadata-key", "metadata-last", "zero-size-ties"])
def test_small_headers(tmp_path, text, size):
    _assert_same(_write(tmp_path / "m.safetensors", text, size))


def _ok(name="a"):
    return f'"{name}": {{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'


#: JSON the Python parse takes (and may accept) that the native one leaves to it
DECLINED_VALID = {
    "float-dims": ('{"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', 8),
    "string-offsets": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}', 8),
    "extra-entry-key": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": null}}', 8),
    "duplicate-name": ("{" + _ok() + ", " + _ok() + "}", 8),
    "duplicate-entry-key": ('{"a": {"dtype": "F16", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8),
    "lone-surrogate": ("{" + _ok("x\\ud800") + "}", 8),
    "metadata-not-strings": ('{"__metadata__": {"format": "pt", "n": 1}, ' + _ok() + "}", 8),
    "metadata-null": ('{"__metadata__": null, ' + _ok() + "}", 8),
    "duplicate-metadata-key": ('{"__metadata__": {"k": "1", "k": "2"}, ' + _ok() + "}", 8),
    "utf8-bom": ("\ufeff{" + _ok() + "}", 8),
}


@needs_native
@pytest.mark.parametrize("case", list(DECLINED_VALID))
def test_declined_then_python(tmp_path, case):
    text, size = DECLINED_VALID[case]
    p = _write(tmp_path / "m.safetensors", text, size)
    native, expected = _parse_both(p)
    assert native is None
    meta, by_name, _ = index._read_header(p)
    assert (meta, list(by_name.values())) == expected and list(by_name) == [t.name for t in expected[1]]


_A = '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
_B = '"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}'

#: malformed headers -> a piece of the Python parse's message
MALFORMED = {
    "truncated-json": ("{" + _A + ", " + _B[:30], 16, "not JSON"),
    "trailing-data": ("{" + _A + "} x", 8, "not JSON"),
    "invalid-utf8": (b'{"\xff": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "not JSON"),
    "control-char": ('{"a\x01": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "not JSON"),
    "leading-zero": ('{"a": {"dtype": "F32", "shape": [02], "data_offsets": [0, 8]}}', 8, "not JSON"),
    "not-an-object": ("[" + "1, 2" + "]", 0, "not a JSON object"),
    "entry-not-object": ('{"a": [0, 8]}', 8, "corrupt safetensors header entry for tensor 'a'"),
    "missing-dtype": ('{"a": {"shape": [2], "data_offsets": [0, 8]}}', 8, "entry for tensor 'a'"),
    "missing-offsets": ('{"a": {"dtype": "F32", "shape": [2]}}', 8, "entry for tensor 'a'"),
    "three-offsets": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}', 8, "entry for tensor 'a'"),
    "shape-not-list": ('{"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}', 8, "entry for tensor 'a'"),
    "nan-offset": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}', 8, "entry for tensor 'a'"),
    "unknown-dtype": ('{"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}', 8, "unknown dtype F33"),
    "unsupported-dtype": ('{"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}', 8, "unsupported dtype I32"),
    "negative-dim": ('{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', 8, "inconsistent shape [-2]"),
    "shape-offset-mismatch": ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', 8, "inconsistent shape [3]"),
    "end-before-begin": ('{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}', 8, "offsets [8, 0]"),
    "past-end-of-file": ("{" + _A + ", " + _B + "}", 12, "tensor 'b' ends at byte"),
    "gap": ("{" + _A + ", " + _B.replace("[8, 16]", "[12, 20]") + "}", 20, "4 unused bytes after tensor 'a'"),
    "gap-at-start": ("{" + _B + "}", 16, "8 unused bytes at the start of the data"),
    "overlap": ("{" + _A + ", " + _B.replace("[8, 16]", "[4, 12]") + "}", 12, "tensors 'a' and 'b' overlap"),
    "bytes-after": ("{" + _A + "}", 9, "1 bytes after the last tensor"),
    "duplicate-name-gap": ("{" + _A + ", " + _B + ", " + _A.replace("[0, 8]", "[16, 24]") + "}", 24, "8 unused bytes at the start"),
    "huge-numel": ('{"a": {"dtype": "F32", "shape": [100000000000000000, 100], "data_offsets": [0, 8]}}', 8, "inconsistent shape"),
    "19-digit-offset": ('{"a": {"dtype": "F32", "shape": [1000000000000000000], "data_offsets": [0, 4000000000000000000]}}', 8,
                        "truncated file: tensor 'a' ends at byte"),
}


@needs_native
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_same_error(tmp_path, monkeypatch, case):
    text, size, msg = MALFORMED[case]
    p = _write(tmp_path / "model.safetensors", text, size)
    assert _native_parse(p) is None
    with pytest.raises(CheckpointError) as native_first:
        CheckpointIndex.open(tmp_path)
    monkeypatch.setattr(index, "_NATIVE_PARSE", None)
    with pytest.raises(CheckpointError) as python_only:
        CheckpointIndex.open(tmp_path)
    assert str(native_first.value) == str(python_only.value)
    assert str(native_first.value).startswith(f"{p}: ") and msg in str(native_first.value)
    assert "\n" not in str(native_first.value)


@needs_native
def test_native_path_is_taken(tmp_path, monkeypatch):
    base, _ = make_family(tmp_path, DEEPSEEK, n_finetunes=0, shard_bytes=20_000)
    monkeypatch.setattr(index, "_NATIVE_PARSE", None)
    python = CheckpointIndex.open(base)
    monkeypatch.undo()

    def no_python(*a):
        raise AssertionError("the Python header parse ran")

    monkeypatch.setattr(index, "_parse_header", no_python)
    native = CheckpointIndex.open(base)
    assert list(native.tensors) == list(python.tensors)
    assert list(native.tensors.values()) == list(python.tensors.values())
    assert native.header_sha256 == python.header_sha256 and native.files == python.files
    # each TensorInfo holds the Path object of its shard (the index check compares them by identity first)
    assert {id(t.file) for t in native.tensors.values()} == {id(f) for f in native.files}


@needs_native
def test_gc_state_restored(tmp_path):
    """The parse pauses the garbage collector while it builds the TensorInfo objects, and leaves it as it was."""
    header, size = _layout([("a", "F32", [3]), ("b", "BF16", [2, 2])])
    p = _write(tmp_path / "m.safetensors", json.dumps(header), size)
    assert gc.isenabled()
    assert _native_parse(p) is not None and gc.isenabled()
    gc.disable()
    try:
        assert _native_parse(p) is not None and not gc.isenabled()
    finally:
        gc.enable()


def test_python_path_without_native(tmp_path, monkeypatch):
    """The Python parse alone (a build without ``_C``) opens a MoE family: every tensor, back to back per shard."""
    base, _ = make_family(tmp_path, QWEN, n_finetunes=0, shard_bytes=20_000)
    monkeypatch.setattr(index, "_NATIVE_PARSE", None)
    ix = CheckpointIndex.open(base)
    assert {n: t.shape for n, t in ix.tensors.items()} == dict(QWEN.tensors())
    assert {t.dtype for t in ix.tensors.values()} == {"bfloat16"} and len(ix.files) > 1


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_identical_headers_are_parsed_once_per_plan(tmp_path, monkeypatch, native):
    """Fine-tunes of one model hold byte-identical headers: with one ``shared`` dict across the opens (as
    ``build_plan`` does) each distinct header is parsed once, and every index equals a plain open of its model
    (every TensorInfo field, each row holding its own file's Path object), its names and shapes the same objects."""
    if native and not _native.HAS_CPU_EXT:
        pytest.skip("fastmerge._C not built")
    base, fts = make_family(tmp_path / "fam", DEEPSEEK, n_finetunes=2, shard_bytes=20_000)
    other, _ = make_family(tmp_path / "other", QWEN, n_finetunes=0, shard_bytes=20_000)
    if not native:
        monkeypatch.setattr(index, "_NATIVE_PARSE", None)
    plain = [CheckpointIndex.open(m) for m in (base, *fts, other)]
    parses = []
    if native:
        real = index._NATIVE_PARSE
        monkeypatch.setattr(index, "_NATIVE_PARSE", lambda raw, *a: parses.append(raw) or real(raw, *a))
    else:
        real = index._parse_header
        monkeypatch.setattr(index, "_parse_header", lambda path, raw, *a: parses.append(raw) or real(path, raw, *a))
    shared: dict = {}
    opened = [CheckpointIndex.open(m, shared) for m in (base, *fts, other)]
    assert len(plain[0].files) > 1  # several shards, each its own header
    assert len(parses) == len(set(parses)) == len(plain[0].files) + len(plain[3].files)
    for a, b in zip(opened, plain):
        assert list(a.tensors.items()) == list(b.tensors.items())  # TensorInfo equality: every field, file included
        assert (a.files, a.header_sha256, a.file_counts, a.root) == (b.files, b.header_sha256, b.file_counts, b.root)
        assert {id(t.file) for t in a.tensors.values()} == {id(f) for f in a.files}
    first, ft2 = opened[0].tensors.values(), opened[2].tensors.values()
    assert all(x.name is y.name and x.shape is y.shape and x.file is not y.file for x, y in zip(first, ft2))


def test_a_shared_header_on_a_file_of_another_size_is_checked_again(tmp_path):
    """The same header bytes in a file whose data section is cut short: its own error, not the first file's rows."""
    header, size = _layout([("a", "F32", [3]), ("b", "BF16", [2, 2])])
    (tmp_path / "good").mkdir()
    (tmp_path / "cut").mkdir()
    good = _write(tmp_path / "good" / "model.safetensors", json.dumps(header), size)
    cut = _write(tmp_path / "cut" / "model.safetensors", json.dumps(header), size - 1)
    shared: dict = {}
    assert list(CheckpointIndex.open(good.parent, shared).tensors) == ["a", "b"]
    with pytest.raises(CheckpointError) as got:
        CheckpointIndex.open(cut.parent, shared)
    with pytest.raises(CheckpointError) as alone:
        CheckpointIndex.open(cut.parent)
    assert str(got.value) == str(alone.value) and str(got.value).startswith(f"{cut}: ")
