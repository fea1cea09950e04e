"""--resume: a merge killed with SIGKILL after some shards, resumed, gives the bytes of an uninterrupted
run; a corrupted finished shard is redone; a changed config is refused with one line; an old temporary
folder is never reused without --resume; a failure keeps the completed shards for --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from fastmerge import cli, merge, plan as make_plan
from fastmerge.engine.distributed import MANIFEST_GLOB, PLAN_FILE, tmp_dir_for
from fastmerge.errors import OutputError
from helpers.dist import error_lines, tree_bytes

SHARD = "30K"


@pytest.fixture
def job(family_bf16, tmp_path):
    base, fts = family_bf16
    doc = {"merge_method": "dare_ties", "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]}
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(doc))
    ref = tmp_path / "ref"
    merge(cfg, ref, out_shard_size=SHARD, seed=3, progress=False)
    return cfg, doc, tree_bytes(ref), tmp_path / "out"


def killed_after(cfg, out, shards: int):
    """`fastmerge merge` in a child that SIGKILLs itself after ``shards`` completed shards."""
    env = {**os.environ, "FASTMERGE_TEST_DIE_AFTER_SHARDS": str(shards)}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out), "--out-shard-size", SHARD,
                        "--seed", "3", "-q"], env=env, capture_output=True, text=True, timeout=120, cwd=out.parent)
    assert p.returncode == -9, p.stderr[-2000:]
    assert not out.exists()
    tmp = tmp_dir_for(out, make_plan(cfg, None, out_shard_size=SHARD, seed=3).digest())
    lines = [json.loads(x) for m in tmp.glob(MANIFEST_GLOB) for x in m.read_text().splitlines()]
    assert len(lines) == shards and (tmp / PLAN_FILE).is_file()
    return tmp, [x["shard"] for x in lines]


def test_kill9_then_resume_gives_the_uninterrupted_bytes(job, capsys):
    cfg, _, want, out = job
    tmp, done = killed_after(cfg, out, 3)
    # without --resume the folder is never reused: one line naming it and --resume
    assert cli.main(["merge", str(cfg), str(out), "--out-shard-size", SHARD, "--seed", "3", "-q"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and tmp.name in lines[0] and "--resume" in lines[0]
    report = merge(cfg, out, out_shard_size=SHARD, seed=3, progress=False, resume=True)
    assert report.kept_shards == 3 and "kept" in capsys.readouterr().err
    assert tree_bytes(out) == want
    assert not tmp.exists()


def test_a_corrupted_finished_shard_is_redone(job, capsys):
    cfg, _, want, out = job
    tmp, done = killed_after(cfg, out, 3)
    f = tmp / done[1]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    report = merge(cfg, out, out_shard_size=SHARD, seed=3, progress=False, resume=True)
    assert report.kept_shards == 2
    assert f"{done[1]} (checksum)" in capsys.readouterr().err
    assert tree_bytes(out) == want


def test_resume_of_a_changed_config_is_refused(job, capsys):
    cfg, doc, _, out = job
    tmp, _ = killed_after(cfg, out, 2)
    doc["models"][0]["parameters"]["density"] = 0.7
    cfg.write_text(yaml.safe_dump(doc))
    assert cli.main(["merge", str(cfg), str(out), "--out-shard-size", SHARD, "--seed", "3", "-q", "--resume"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "different plan" in lines[0] and tmp.name in lines[0], lines
    assert tmp.is_dir() and not out.exists()  # the interrupted merge is left as it was
    # another seed is another plan too
    doc["models"][0]["parameters"]["density"] = 0.5
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(OutputError, match="different plan"):
        merge(cfg, out, out_shard_size=SHARD, seed=4, progress=False, resume=True)


def test_resume_with_nothing_to_resume_starts_fresh(job, capsys):
    cfg, _, want, out = job
    report = merge(cfg, out, out_shard_size=SHARD, seed=3, progress=False, resume=True)
    assert report.kept_shards == 0 and "starting from the beginning" in capsys.readouterr().err
    assert tree_bytes(out) == want


def test_a_failure_keeps_completed_shards_for_resume(job, monkeypatch):
    cfg, _, want, out = job
    from fastmerge.io import writer

    real = writer.ShardWriter._append  # every file write of tensor bytes (``write`` and a run's ``write_run``)
    calls = {"n": 0}

    def failing(self, si, data, count):
        calls["n"] += count
        if calls["n"] >= 12:
            raise OSError(28, "No space left on device", str(self.dir / "x"))
        return real(self, si, data, count)

    monkeypatch.setattr(writer.ShardWriter, "_append", failing)
    with pytest.raises(OutputError, match=r"No space left.*completed shard\(s\) are kept in .*--resume"):
        merge(cfg, out, out_shard_size=SHARD, seed=3, progress=False)
    monkeypatch.setattr(writer.ShardWriter, "_append", real)
    assert not out.exists()
    report = merge(cfg, out, out_shard_size=SHARD, seed=3, progress=False, resume=True)
    assert report.kept_shards > 0 and tree_bytes(out) == want
