"""Bad input never costs data: each case fails before heavy work with exit code != 0, one line naming the
file / tensor / field, inputs untouched, and nothing left at OUT (nor a temp dir beside it)."""

import struct

import pytest
import yaml
from safetensors.torch import save_file

from fastmerge import cli
from fastmerge.io import writer as writer_mod
from fastmerge.testing import LlamaShape, make_family
from helpers.tolerance import file_digest

SHAPE = LlamaShape(hidden=32, layers=2, intermediate=64, vocab=50, heads=2)


@pytest.fixture
def fam(tmp_path):
    base, fts = make_family(tmp_path / "in", SHAPE, n_finetunes=2, dtype="bfloat16", shard_bytes=8_000)
    return tmp_path, base, fts


def _write_cfg(tmp, base, fts, method="ties", **over):
    d = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts],
    }
    d.update(over)
    p = tmp / "cfg.yml"
    p.write_text(yaml.safe_dump(d))
    return p


def _fails(capsys, tmp, args, needle, out=None):
    inputs = tmp / "in"
    before = file_digest(inputs)
    out = out or tmp / "out"
    rc = cli.main(["merge", *map(str, args), str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert file_digest(inputs) == before, "an input was modified"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.fastmerge")]
    assert not leftovers
    return lines[0], out


def test_missing_model_path(fam, capsys):
    tmp, base, fts = fam
    cfg = _write_cfg(tmp, base, [fts[0], tmp / "in" / "nope"])
    _, out = _fails(capsys, tmp, [cfg], "nope: model path not found")
    assert not out.exists()


def test_missing_shard(fam, capsys):
    tmp, base, fts = fam
    shard = sorted(fts[1].glob("model-*.safetensors"))[1]
    shard.rename(shard.with_suffix(".moved"))
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], f"{shard.name}: shard listed in model.safetensors.index.json is missing")


def test_corrupt_header(fam, capsys):
    tmp, base, fts = fam
    shard = sorted(fts[0].glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[0:8] = struct.pack("<Q", len(raw) * 2)
    shard.write_bytes(bytes(raw))
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], f"{shard.name}: corrupt safetensors header")


def test_truncated_file(fam, capsys):
    tmp, base, fts = fam
    shard = sorted(fts[0].glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], f"{shard.name}: truncated file")


def _rewrite_model(folder, fn):
    """Replace ``folder``'s shards by one model.safetensors holding fn(tensors)."""
    from fastmerge.io.index import CheckpointIndex
    from safetensors import safe_open

    ix = CheckpointIndex.open(folder)
    sd = {}
    for n, info in ix.tensors.items():
        with safe_open(str(info.file), framework="pt") as f:
            sd[n] = f.get_tensor(n).clone()
    for p in folder.glob("model*"):
        p.unlink()
    save_file(fn(sd), str(folder / "model.safetensors"))


def test_tensor_missing_in_one_model(fam, capsys):
    tmp, base, fts = fam
    _rewrite_model(fts[1], lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"})
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], "tensor 'model.norm.weight' is missing")


def test_shape_mismatch(fam, capsys):
    tmp, base, fts = fam
    _rewrite_model(fts[0], lambda sd: {**sd, "lm_head.weight": sd["lm_head.weight"][:-1].contiguous()})
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], "tensor 'lm_head.weight': shape [49, 32]")


def test_unsupported_dtype(fam, capsys):
    tmp, base, fts = fam
    _rewrite_model(fts[0], lambda sd: {**sd, "model.norm.weight": sd["model.norm.weight"].double()})
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], "tensor 'model.norm.weight' has unsupported dtype F64")


@pytest.mark.parametrize("density", [0.0, 1.2, -0.5])
def test_density_out_of_range(fam, capsys, density):
    tmp, base, fts = fam
    cfg = _write_cfg(tmp, base, fts)
    d = yaml.safe_load(cfg.read_text())
    d["models"][1]["parameters"]["density"] = density
    cfg.write_text(yaml.safe_dump(d))
    _fails(capsys, tmp, [cfg], f"density of model #2 ({fts[1]}) must be in (0, 1]")


def test_weights_sum_to_zero_under_normalize(fam, capsys):
    tmp, base, fts = fam
    d = {"merge_method": "linear", "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}},
                                             {"model": str(fts[1]), "parameters": {"weight": -1.0}}]}
    cfg = tmp / "lin.yml"
    cfg.write_text(yaml.safe_dump(d))
    _fails(capsys, tmp, [cfg], "weights sum to 0 with normalize: true")


def test_unknown_method(fam, capsys):
    tmp, base, fts = fam
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts, method="tis")], "unknown method 'tis' (did you mean 'ties'?)")


def test_parameter_typo_suggests(fam, capsys):
    tmp, base, fts = fam
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts, parameters={"lamda": 0.5})], "unknown parameter 'lamda' (did you mean 'lambda'?)")


def test_unused_parameter_only_warns(fam, capsys):
    tmp, base, fts = fam
    rc = cli.main(["merge", str(_write_cfg(tmp, base, fts, parameters={"gamma": 0.01})), str(tmp / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and "warning" in err and "gamma" in err and (tmp / "out" / "config.json").exists()


def test_out_exists_without_overwrite(fam, capsys):
    tmp, base, fts = fam
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], "output exists (pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_out_inside_an_input(fam, capsys):
    tmp, base, fts = fam
    out = fts[0] / "merged"
    _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], "output overlaps input model folder", out=out)
    assert not out.exists()


def test_write_failure_mid_merge(fam, capsys, monkeypatch):
    tmp, base, fts = fam
    real = writer_mod.ShardWriter._append  # every write of tensor bytes (one tensor, or a run of small ones)
    calls = {"n": 0}

    def failing(self, si, data, count):
        calls["n"] += count
        if calls["n"] >= 5:
            raise OSError(28, "No space left on device", str(self.dir / "model-00002.safetensors"))
        return real(self, si, data, count)

    monkeypatch.setattr(writer_mod.ShardWriter, "_append", failing)
    line, out = _fails(capsys, tmp, [_write_cfg(tmp, base, fts)], "No space left on device")
    assert not out.exists() and calls["n"] >= 5


def test_failure_keeps_existing_output_with_overwrite(fam, capsys):
    tmp, base, fts = fam
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = _write_cfg(tmp, base, [fts[0], tmp / "in" / "nope"])
    rc = cli.main(["merge", str(cfg), str(out), "--overwrite", "--no-progress"])
    assert rc != 0 and (out / "keep.txt").read_text() == "mine"
