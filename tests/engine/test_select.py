"""The one engine selector: ``engine.select(plan)`` takes the first engine with no reasons, the merge
report names it, and ``fastmerge plan --explain`` names it and why the others were skipped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from fastmerge import _native, cli, engine, merge, plan
from fastmerge.testing import LlamaShape, make_family

SHAPE = LlamaShape(hidden=32, layers=2, intermediate=64, vocab=50, heads=4)
needs_native = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason="fastmerge._C not built")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    base, fts = make_family(root / "fam", SHAPE, n_finetunes=2, dtype="bfloat16", shard_bytes=10**9)
    np.save(root / "calib.npy", np.random.default_rng(0).integers(0, SHAPE.vocab, (2, 8)))
    return {"root": root, "base": base, "fts": fts, "calib": root / "calib.npy"}


def _doc(fam, method="ties", **extra):
    models = [{"model": str(f), "parameters": {"weight": 0.5}} for f in fam["fts"]]
    d = {"merge_method": method, "base_model": str(fam["base"]), "models": models,
         "parameters": {"density": 0.5}}
    d.update(extra)
    return d


def _name(p):
    return engine.select(p)[0].name


@needs_native
def test_a_native_plan_runs_without_torch_on_the_native_engine(fam, tmp_path):
    p = plan(_doc(fam))
    chosen, skipped = engine.select(p)
    assert chosen.name == "native"
    assert list(skipped) == ["sweep", "layerwise", "gpu"]  # in preference order, each with its reason
    assert skipped["gpu"] == ["device cpu"]
    assert skipped["layerwise"] == ["'ties' merges tensor by tensor (no forward passes)"]
    report = merge(_doc(fam), tmp_path / "o", progress=False)
    assert report.engine == "native" and report.backends == {"native": len(p.tensors)}


def test_other_plans_go_to_their_engines(fam):
    p = plan(_doc(fam), backend="torch")
    assert _name(p) == "torch"
    assert any("runs on torch" in r for r in engine.explain(p)["native"])
    cart = {"merge_method": "cart", "models": [{"model": str(f)} for f in fam["fts"]], "rank_sweep": [0.1, 0.2]}
    sp = plan(cart)
    assert _name(sp) == "sweep"
    assert engine.explain(sp)["torch"] == ["rank_sweep writes one model per rank ratio (the sweep engine)"]
    mp = plan(_doc(fam, "m_ties", parameters={"density": 0.8, "calibration": str(fam["calib"])}))
    assert _name(mp) == "layerwise"
    assert engine.explain(mp)["torch"] == ["'m_ties' runs on the layerwise engine only"]
    # a CUDA plan is the GPU engine's, whatever its tensors (no GPU needed to select it)
    assert _name(dataclasses.replace(p, device="cuda")) == "gpu"


def test_merge_reports_the_engine_that_ran(fam, tmp_path):
    r = merge(_doc(fam), tmp_path / "t", progress=False, backend="torch")
    assert r.engine == "torch" and r.backends == {"torch": len(plan(_doc(fam)).tensors)}
    assert "engine: torch" in r.summary()


def test_plan_explain_names_the_engine_and_why_not_the_others(fam, tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_doc(fam)))
    assert cli.main(["plan", str(cfg), "--explain", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert ", engine torch" in out.splitlines()[0]
    assert "  engine gpu skipped: device cpu" in out
    assert "  engine native skipped: tensor 'model.embed_tokens.weight' runs on torch" in out
    assert cli.main(["plan", str(cfg), "--json"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["engine"]["name"] == ("native" if _native.HAS_CPU_EXT else "torch")
