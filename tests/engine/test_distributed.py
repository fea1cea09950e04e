"""torchrun ranks (gloo on 127.0.0.1): the same bytes as one process for 1, 2 and 3 ranks (ties, dare_ties,
slerp, a slices frankenmerge, a tokenizer_source merge), one line when ranks disagree on the plan, every
rank stopping when one is killed (and --resume finishing the job), the shard partition."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from fastmerge import merge, plan as make_plan
from fastmerge.engine.distributed import partition, shard_weights, tmp_dir_for
from fastmerge.testing import LlamaShape, make_family, make_vocab_family, vocab_tokens
from helpers.dist import error_lines, run_ranks, tree_bytes

TINY = LlamaShape(hidden=64, layers=3, intermediate=176, vocab=301, heads=4)
SHARD = "30K"  # ~17 shards: every rank has several


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (config file, extra CLI flags), and the single-process output of each."""
    root = tmp_path_factory.mktemp("dist")
    base, fts = make_family(root / "fam", TINY, n_finetunes=2, dtype="bfloat16", shard_bytes=40_000)
    v = vocab_tokens(44)
    vf = make_vocab_family(root / "vfam", LlamaShape(hidden=32, layers=2, intermediate=48, vocab=40, heads=2),
                           {"base": v[:40], "ft1": v, "ft2": v[:3] + v[3:40][::-1]}, dtype="float32")
    docs = {
        "ties": {"merge_method": "ties", "base_model": str(base),
                 "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(base),
                      "models": [{"model": str(f), "parameters": {"weight": 0.6, "density": 0.4}} for f in fts]},
        "slerp": {"merge_method": "slerp", "base_model": str(fts[0]),
                  "models": [{"model": str(fts[0])}, {"model": str(fts[1])}], "parameters": {"t": 0.3}},
        "slices": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(fts[1]), "layer_range": [1, 3]}]}]},
        "tokenizer": {"merge_method": "task_arithmetic", "base_model": str(vf["base"]), "tokenizer_source": "base",
                      "models": [{"model": str(vf[k]), "parameters": {"weight": 0.5}} for k in ("ft1", "ft2")]},
    }
    out = {}
    for name, doc in docs.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(doc))
        flags = ["--out-shard-size", SHARD if name != "tokenizer" else "6K", "-q", "--seed", "7"]
        ref = root / f"ref-{name}"
        merge(cfg, ref, out_shard_size=flags[1], progress=False, seed=7)
        out[name] = (cfg, flags, tree_bytes(ref))
    return root, out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_write_the_single_process_bytes(cases, world):
    root, cs = cases
    outs = {name: root / f"w{world}-{name}" for name in cs}
    res = run_ranks(world, [["merge", str(cfg), str(outs[name]), *flags] for name, (cfg, flags, _) in cs.items()])
    for r, (rc, so, se) in enumerate(res):
        assert rc == 0, f"rank {r}: {se[-3000:]}"
    assert res[0][1].count("merged") == len(cs)  # one summary per merge, from rank 0 only
    assert all("merged" not in so for _, so, _ in res[1:])
    for name, (_, _, want) in cs.items():
        assert tree_bytes(outs[name]) == want, name
        assert not list(root.glob(f".{outs[name].name}.fastmerge-*")), "temporary folder left"


def test_torchrun_just_works(cases):
    root, cs = cases
    cfg, flags, want = cs["dare_ties"]
    out = root / "torchrun-dare"
    import subprocess
    import sys

    from helpers.dist import free_port

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                        "-m", "fastmerge", "merge", str(cfg), str(out), *flags],
                       capture_output=True, text=True, timeout=120, cwd=out.parent)  # not the repository: see helpers.dist
    assert p.returncode == 0, p.stderr[-3000:]
    assert tree_bytes(out) == want


def test_ranks_that_see_different_files_stop_with_one_line(cases, tmp_path):
    """The same relative paths, other files on each "node" (a working directory per rank)."""
    _, cs = cases
    for r, shard in ((0, 40_000), (1, 25_000)):  # same models, another shard layout on rank 1's node
        make_family(tmp_path / f"node{r}" / "m", TINY, n_finetunes=1, dtype="bfloat16", shard_bytes=shard)
    cfg = tmp_path / "rel.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "m/base",
                                   "models": [{"model": "m/ft1", "parameters": {"weight": 1.0, "density": 0.5}}]}))
    out = tmp_path / "out"
    res = run_ranks(2, [["merge", str(cfg), str(out), "-q"]], cwd={0: tmp_path / "node0", 1: tmp_path / "node1"})
    for rc, _, se in res:
        lines = error_lines(se)
        assert rc == 2 and len(lines) == 1, se[-2000:]
        assert "ranks disagree on the plan" in lines[0] and "rank 1 on" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.fastmerge-*"))


def test_out_not_shared_by_every_rank_stops_with_one_line(cases, tmp_path):
    """Two "nodes" that do not share OUT's filesystem: the same relative OUT is another folder on each
    (a working directory per rank), so rank 1 cannot see the marker rank 0 wrote in the temp folder."""
    root, cs = cases
    cfg, flags, _ = cs["ties"]
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    res = run_ranks(2, [["merge", str(cfg), "out", *flags]], cwd={0: tmp_path / "node0", 1: tmp_path / "node1"})
    for rc, _, se in res:
        lines = error_lines(se)
        assert rc == 2 and len(lines) == 1, se[-2000:]
    line = error_lines(res[0][2])[0]
    assert "is not shared by every rank" in line and "rank 1 on" in line and "filesystem every node mounts" in line
    for r in (0, 1):  # nothing at OUT on either node, no temp folder left behind
        assert not (tmp_path / f"node{r}" / "out").exists()
        assert not list((tmp_path / f"node{r}").glob(".out.fastmerge-*"))


def test_a_killed_rank_stops_every_rank_and_resume_finishes(cases):
    root, cs = cases
    cfg, flags, want = cs["ties"]
    out = root / "killed"
    res = run_ranks(2, [["merge", str(cfg), str(out), *flags]], init_group=False, module=True,
                    env={0: {"FASTMERGE_DIST_HEARTBEAT": "2"},
                         1: {"FASTMERGE_DIST_HEARTBEAT": "2", "FASTMERGE_TEST_DIE_AFTER_SHARDS": "2"}})
    assert res[1][0] == -9  # SIGKILL, as the OOM killer
    rc, _, se = res[0]
    lines = error_lines(se)
    assert rc == 2 and len(lines) == 1, se[-2000:]
    assert "rank 1 on" in lines[0] and "stopped answering" in lines[0] and "--resume" in lines[0]
    assert not out.exists()
    tmp = tmp_dir_for(out, make_plan(cfg, None, out_shard_size=SHARD, seed=7).digest())
    assert tmp.is_dir()
    # 3 ranks pick it up where 2 left off
    res = run_ranks(3, [["merge", str(cfg), str(out), *flags, "--resume"]])
    assert all(rc == 0 for rc, _, _ in res), res[0][2][-2000:]
    assert "--resume:" in res[0][2] and "kept" in res[0][2]
    assert tree_bytes(out) == want and not tmp.exists()


def test_partition_balances_bytes_deterministically(family_bf16):
    base, fts = family_bf16
    p = make_plan({"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts]},
                  None, out_shard_size="20K")
    w = shard_weights(p)
    for world in (1, 2, 3, 8):
        part = partition(w, world)
        assert sorted(i for r in part.ranks for i in r) == list(range(len(w)))
        assert part.loads == [sum(w[i] for i in r) for r in part.ranks]
        assert max(part.loads) <= sum(w) / world + max(w)  # LPT: within one shard of the mean
        assert partition(w, world) == part
    assert partition([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2).loads == [10, 10]  # the big one alone: not round-robin


def test_plan_explain_world_size(family_bf16, tmp_path, capsys):
    from fastmerge import cli

    base, fts = family_bf16
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear",
                                   "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts]}))
    assert cli.main(["plan", str(cfg), "--out-shard-size", "20K", "--world-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "partition over 4 rank(s)" in text and "rank 3:" in text and "imbalance" in text
    assert "model.embed_tokens.weight" not in text  # the partition alone, not the tensor list
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_digest_is_stable_and_sensitive(family_bf16, tmp_path):
    base, fts = family_bf16
    doc = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]}
    d = make_plan(doc).digest()
    assert make_plan(doc, threads=3, progress=False, overwrite=True).digest() == d  # options that change no byte
    assert make_plan(doc, seed=1).digest() != d
    assert make_plan(doc, out_shard_size="20K").digest() != d
    doc2 = {**doc, "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.6}} for f in fts]}
    assert make_plan(doc2).digest() != d
    assert Path(base).is_dir()


def test_one_process_merge_chooses_its_engine_with_the_plan_frozen(family_bf16, tmp_path, monkeypatch):
    """A one-process merge freezes the plan's objects (built while the collector was paused) before the engine is
    chosen, so no collection walks them again (on a 20k-tensor plan the first one cost ~20 ms), and unfreezes them
    after: nothing stays frozen."""
    import gc

    import fastmerge.engine as engine

    real, frozen = engine.select, []

    def spy(p):
        frozen.append(gc.get_freeze_count())
        return real(p)

    monkeypatch.setattr(engine, "select", spy)
    base, fts = family_bf16
    doc = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]}
    assert gc.get_freeze_count() == 0
    merge(doc, tmp_path / "out", progress=False)
    assert frozen and frozen[0] > 1000  # the plan (its TensorPlans, TensorInfos, ...) among them
    assert gc.get_freeze_count() == 0


def test_nested_gc_frozen_asks_the_freeze_count_once(monkeypatch):
    """``gc_frozen`` inside another (``_run`` inside ``_one_process``) leaves the freeze to the outer call and does not
    ask ``gc.get_freeze_count``, which walks every frozen object (~8 ms once a MoE plan is frozen); the outer call
    still unfreezes everything, and a freeze the process made itself is left as it was."""
    import gc

    from fastmerge._memo import gc_frozen

    asked = []
    real = gc.get_freeze_count
    monkeypatch.setattr(gc, "get_freeze_count", lambda: asked.append(1) or real())
    seen = []

    @gc_frozen
    def inner():
        seen.append(real())

    @gc_frozen
    def outer():
        keep = [[i] for i in range(1000)]  # noqa: F841 (objects that exist when the outer call freezes)
        inner()
        seen.append(real())

    assert real() == 0
    outer()
    assert len(asked) == 1 and seen[0] > 0 and seen[1] > 0
    assert real() == 0
    gc.freeze()  # the process's own freeze: kept by both calls
    try:
        n = real()
        outer()
        assert real() == n and len(asked) == 2
    finally:
        gc.unfreeze()
