"""The streaming engine's two I/O flavours (fastmerge.engine.stream): the torch-free native one writes
byte-identical output to the torch one,
no torch import on the command line's merge path, and a fallback (not an error) wherever it cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastmerge import _native, plan
from fastmerge.engine.stream import RawIO, execute
from helpers.tolerance import file_digest

pytestmark = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason="fastmerge._C not built: no native fast path")

CASES = {
    "linear": {"weight": 0.3},
    "task_arithmetic": {"weight": 0.33, "lambda": 0.9},
    "ties": {"weight": 0.33, "density": 0.45},
}


def why_not(p):
    """Why the native (torch-free) flavour cannot run plan ``p``: None if it can."""
    reasons = RawIO.not_supported_reasons(p)
    return "; ".join(reasons) if reasons else None


def execute_native(p, out):
    return execute(p, out, "native")


def _doc(fam, method, **extra):
    base, fts = fam
    models = [{"model": str(f), "parameters": dict(CASES[method])} for f in fts]
    models[1]["parameters"]["weight"] = [0.1, 0.9]  # a gradient over the layers
    models[2]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]
    d = {"merge_method": method, "models": models}
    if method != "linear":
        d["base_model"] = str(base)
    d.update(extra)
    return d


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("fam,extra", [
    ("family_bf16", {}),
    ("family_bf16", {"dtype": "float32", "out_dtype": "float16"}),
    ("family_fp32", {"out_dtype": "bfloat16"}),
])
def test_same_bytes_as_runner(tmp_path, request, method, fam, extra):
    doc = _doc(request.getfixturevalue(fam), method, **extra)
    p = plan(doc, out_shard_size="300K", threads=2)  # several output shards + an index
    assert why_not(p) is None
    fast = execute_native(p, tmp_path / "fast")
    ref = execute(plan(doc, out_shard_size="300K", threads=2), tmp_path / "ref")
    assert len(p.shards) > 1
    assert _digests(tmp_path / "fast") == _digests(tmp_path / "ref")  # every shard, the index, config.json
    assert fast.backends == {"native": len(p.tensors)} == ref.backends
    assert fast.bytes_written == ref.bytes_written > 0


def test_passthrough_is_a_byte_copy(tmp_path, family_bf16):
    """A frankenmerge (passthrough slices, layers repeated) copies bytes on the fast path: identical to the
    runner's; a scale or a dtype change is arithmetic and falls back to the runner."""
    base, fts = family_bf16
    doc = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fts[1]), "layer_range": [1, 3]}]},
    ]}
    p = plan(doc, out_shard_size="300K")
    assert why_not(p) is None
    fast = execute_native(p, tmp_path / "fast")
    ref = execute(plan(doc, out_shard_size="300K", backend="torch"), tmp_path / "ref")
    assert _digests(tmp_path / "fast") == _digests(tmp_path / "ref")
    assert fast.backends == {"native": len(p.tensors)} and ref.backends == {"torch": len(p.tensors)}
    assert "a conversion" in why_not(plan(doc | {"out_dtype": "float32"}))
    scaled = {"merge_method": "passthrough", "models": [{"model": str(fts[0]), "parameters": {"scale": 0.5}}]}
    assert "scale 0.5" in why_not(plan(scaled))
    for d, name in ((doc | {"out_dtype": "float32"}, "conv"), (scaled, "scaled")):  # the runner's native path
        a = execute(plan(d), tmp_path / f"{name}-native")
        b = execute(plan(d, backend="torch"), tmp_path / f"{name}-torch")
        assert a.backends == {"native": len(plan(d).tensors)} and b.backends == {"torch": len(plan(d).tensors)}
        assert _digests(tmp_path / f"{name}-native") == _digests(tmp_path / f"{name}-torch")


@pytest.mark.parametrize("extra", [{}, {"out_dtype": "float32"}])
def test_nearswap_on_the_fast_path(tmp_path, family_bf16, extra):
    base, fts = family_bf16
    doc = {"merge_method": "nearswap", "base_model": str(base), "models": [{"model": str(fts[0])}],
           "parameters": {"t": 0.003}} | extra
    p = plan(doc, out_shard_size="300K")
    assert why_not(p) is None
    fast = execute_native(p, tmp_path / "fast")
    ref = execute(plan(doc, out_shard_size="300K", backend="torch"), tmp_path / "ref")
    assert _digests(tmp_path / "fast") == _digests(tmp_path / "ref")
    assert fast.backends == {"native": len(p.tensors)} and ref.backends == {"torch": len(p.tensors)}
    small_t = doc | {"parameters": {"t": 1e-7}}
    assert "runs on torch" in why_not(plan(small_t))


def test_falls_back_where_it_cannot_run(family_bf16):
    assert "mergekit_compat" in why_not(plan(_doc(family_bf16, "ties"), mergekit_compat=True))
    assert "runs on torch" in why_not(plan(_doc(family_bf16, "ties"), backend="torch"))
    base, fts = family_bf16
    slerp = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(fts[0])}],
             "parameters": {"t": 0.3}}
    assert "runs on torch" in why_not(plan(slerp))
    os.environ["FASTMERGE_FASTPATH"] = "0"
    try:
        assert why_not(plan(_doc(family_bf16, "ties"))) == "FASTMERGE_FASTPATH=0"
    finally:
        del os.environ["FASTMERGE_FASTPATH"]


# The command line, in a child process: the merge must not import torch (1.2-1.7 s of start-up on
# the reference machine); FASTMERGE_FASTPATH=0 takes the runner, which does, and writes the same bytes.
_CHILD = """
import sys
from fastmerge.cli import main
rc = main(sys.argv[1:])
print("TORCH_LOADED=" + str("torch" in sys.modules))
sys.exit(rc)
"""


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_cli_merge_does_not_import_torch(tmp_path, family_bf16, method):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(_doc(family_bf16, method, dtype="bfloat16")))
    outs = {}
    for flag in ("1", "0"):
        out = tmp_path / f"out{flag}"
        env = {**os.environ, "FASTMERGE_FASTPATH": flag}
        r = subprocess.run([sys.executable, "-c", _CHILD, "merge", str(cfg), str(out), "--no-progress"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"TORCH_LOADED={flag == '0'}" in r.stdout, (flag, r.stdout, r.stderr)
        outs[flag] = _digests(out)
    assert outs["1"] == outs["0"]
    assert json.loads((tmp_path / "out1" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bad_output_dir_leaves_nothing(tmp_path, family_bf16):
    """An error while writing (the output's parent is a file) is one clear error and no leftovers."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = plan(_doc(family_bf16, "ties"))
    with pytest.raises(Exception) as e:
        execute_native(p, blocker / "out")
    assert str(blocker) in str(e.value)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["file"]
