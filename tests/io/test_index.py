"""CheckpointIndex: accepted layouts and every rejection, before any tensor byte is read."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.errors import CheckpointError
from fastmerge.io.index import CheckpointIndex, read_safetensors_header
from helpers.checkpoints import random_state, write_sharded


def test_single_file_and_folder(tmp_path):
    sd = random_state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    for p in (tmp_path, tmp_path / "model.safetensors"):
        ix = CheckpointIndex.open(p)
        assert set(ix.tensors) == set(sd)
        for k, t in sd.items():
            assert ix.tensors[k].shape == tuple(t.shape) and ix.tensors[k].dtype == "float32"


def test_sharded_index_in_file_order(tmp_path):
    sd = random_state()
    write_sharded(tmp_path, sd, [["model.layers.1.w", "a.weight"], ["b.bias", "model.layers.0.w"]])
    ix = CheckpointIndex.open(tmp_path)
    assert len(ix.files) == 2
    # shard order, then offset order within the shard
    offs = [(ix.files.index(t.file), t.begin) for t in ix.tensors.values()]
    assert offs == sorted(offs)


def test_neighbours_from_the_checked_layout(tmp_path):
    """``neighbours``: for each tensor after the first, whether it lies right after the one before in the same file
    and dtype, as the offsets, files and dtypes say (taken from the parsed layout, not tensor by tensor)."""
    sd = {f"t{i}": torch.randn(3 + i % 4).to([torch.float32, torch.bfloat16][(i // 3) % 2]) for i in range(14)}
    write_sharded(tmp_path, sd, [[f"t{i}" for i in range(6)], ["t6", "t7"], [f"t{i}" for i in range(8, 14)]])
    ix = CheckpointIndex.open(tmp_path)
    values, adjacent = ix.neighbours
    assert values == list(ix.tensors.values()) and len(ix.files) == 3
    want = [a.file == b.file and a.end == b.begin and a.dtype == b.dtype for a, b in zip(values, values[1:])]
    assert adjacent == want and True in want and want.count(False) >= 3  # dtype changes and a file change
    one = tmp_path / "one"
    one.mkdir()
    save_file({f"x{i}": torch.zeros(5) for i in range(9)}, str(one / "model.safetensors"))
    assert CheckpointIndex.open(one).neighbours[1] is None  # one file, one dtype: all adjacent
    # an index no parse checked (made by hand): no claim about its layout
    assert CheckpointIndex(ix.root, ix.files, ix.tensors, "safetensors").neighbours is None


def test_bin_single_and_indexed(tmp_path):
    sd = random_state(dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ix = CheckpointIndex.open(tmp_path)
    assert ix.fmt == "bin" and set(ix.tensors) == set(sd)
    d2 = tmp_path / "idx"
    d2.mkdir()
    torch.save({k: sd[k] for k in ["a.weight", "b.bias"]}, d2 / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in ["model.layers.0.w", "model.layers.1.w"]}, d2 / "pytorch_model-00002-of-00002.bin")
    wmap = {k: "pytorch_model-00001-of-00002.bin" for k in ["a.weight", "b.bias"]}
    wmap.update({k: "pytorch_model-00002-of-00002.bin" for k in ["model.layers.0.w", "model.layers.1.w"]})
    (d2 / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    assert set(CheckpointIndex.open(d2).tensors) == set(sd)


def _index(tmp_path, wmap):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


@pytest.mark.parametrize(
    "shard,msg",
    [
        ("../evil.safetensors", "relative"),
        ("/abs/model.safetensors", "relative"),
        ("C:\\x\\model.safetensors", "relative"),
        ("model.bin", "not a .safetensors"),
        ("missing.safetensors", "missing"),
    ],
)
def test_bad_index_entries(tmp_path, shard, msg):
    save_file(random_state(), str(tmp_path / "real.safetensors"))
    _index(tmp_path, {"a.weight": shard})
    with pytest.raises(CheckpointError, match=msg):
        CheckpointIndex.open(tmp_path)


def test_index_maps_tensor_to_wrong_shard_and_duplicates(tmp_path):
    sd = random_state()
    write_sharded(tmp_path, sd, [["a.weight", "b.bias"], ["model.layers.0.w", "model.layers.1.w"]])
    doc = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    doc["weight_map"]["a.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="a.weight"):
        CheckpointIndex.open(tmp_path)
    # the same tensor stored in two shards
    d = tmp_path / "dup"
    write_sharded(d, sd, [["a.weight", "b.bias"], ["a.weight", "model.layers.0.w", "model.layers.1.w"]])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: tensor 'a\.weight' is also in "
                                              r"model-00001-of-00002\.safetensors$"):
        CheckpointIndex.open(d)


def test_tensor_missing_from_weight_map(tmp_path):
    sd = random_state()
    write_sharded(tmp_path, sd, [list(sd)])
    doc = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del doc["weight_map"]["b.bias"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="b.bias"):
        CheckpointIndex.open(tmp_path)


def test_corrupt_headers(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file(random_state(), str(f))
    raw = f.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:5])
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    n = struct.unpack("<Q", raw[:8])[0]
    (tmp_path / "json.safetensors").write_bytes(raw[:8] + b"{" * n + raw[8 + n :])
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-10])
    for name, msg in [("short", "truncated"), ("huge", "corrupt"), ("json", "not JSON"), ("trunc", "truncated")]:
        with pytest.raises(CheckpointError, match=msg) as e:
            read_safetensors_header(tmp_path / f"{name}.safetensors")
        assert f"{name}.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_dtype_names_tensor(tmp_path):
    save_file({"ids": torch.arange(4), "w": torch.randn(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'ids'.*I64"):
        CheckpointIndex.open(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        CheckpointIndex.open(tmp_path / "nope")


def _file(path, entries, data_len, pad=b""):
    """A safetensors file with a hand-written header: ``entries`` name -> (dtype, shape, [b, e])."""
    header = json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_len) + pad)
    return path


@pytest.mark.parametrize("case, entries, data_len, pad, msg", [
    # a 4-element fp32 tensor whose bytes are also the first half of another: the library refuses it
    ("overlap", {"a": ("F32", [4], [0, 16]), "b": ("F32", [4], [8, 24])}, 24, b"", "'a' and 'b' overlap"),
    ("same-bytes", {"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [0, 8])}, 8, b"", "overlap"),
    ("gap", {"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [12, 20])}, 20, b"", "4 unused bytes after tensor 'a'"),
    ("late-start", {"a": ("F32", [2], [4, 12])}, 12, b"", "4 unused bytes at the start"),
    ("trailing", {"a": ("F32", [2], [0, 8])}, 8, b"xyz", "3 bytes after the last tensor"),
])
def test_layouts_the_safetensors_library_refuses_are_refused(tmp_path, case, entries, data_len, pad, msg):
    from safetensors import SafetensorError, safe_open

    f = _file(tmp_path / f"{case}.safetensors", entries, data_len, pad)
    with pytest.raises(SafetensorError):  # the library's verdict on the same bytes: the rule we follow
        with safe_open(str(f), "pt") as h:
            [h.get_tensor(k) for k in h.keys()]
    with pytest.raises(CheckpointError, match=msg) as e:
        read_safetensors_header(f)
    assert f"{case}.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_back_to_back_layout_with_an_empty_tensor_is_accepted(tmp_path):
    f = _file(tmp_path / "ok.safetensors", {"a": ("F32", [2], [0, 8]), "e": ("F32", [0], [8, 8]),
                                              "b": ("BF16", [2], [8, 12])}, 12)
    _, infos = read_safetensors_header(f)
    assert [t.name for t in infos] == ["a", "e", "b"]


def test_layer_indices_equal_the_regex_name_by_name():
    """``layer_indices`` (a C loop where ``_C`` has it) gives what ``LAYER_RE.search`` and int() give for each name:
    every word of the pattern at the start or after a dot, numbers with leading zeros or past int64, no dot after
    the number, a word glued to another, non-ASCII names (Python's \\d takes other decimal digits) and MoE names."""
    import random

    from fastmerge import _native
    from fastmerge.io import index

    if _native.HAS_CPU_EXT:
        assert index._NATIVE_LAYERS is not None  # the C loop, not the fallback, is what runs
    rng = random.Random(3)
    tokens = ["layers", "layer", "h", "blocks", "block", "xlayers", "hh", "model", "mlp", "0", "7", "12", "007", "",
              "99999999999999999999", "\u0663", "\u00e9", "-1", "3x"]
    names = [".".join(rng.choice(tokens) for _ in range(rng.randint(0, 7))) for _ in range(20000)]
    names += [f"model.layers.{i // 760}.mlp.experts.{i % 256}.up_proj.weight" for i in range(3000)]
    names += ["transformer.h.0.attn", "gpt_neox.layers.3.x", "encoder.layer.11.out", "blocks.1.2.", "h.1", ""]
    want = [None if m is None else int(m[1]) for m in map(index.LAYER_RE.search, names)]
    assert index.layer_indices(names) == want
    assert sum(w is not None for w in want) > 5000  # the corpus exercises matches, not only misses
    assert index.layer_indices(tuple(names[:50])) == want[:50]
