"""The command line: merge / plan / methods / env / demo, `python -m fastmerge`, `fastmerge-yaml`."""

import json
import subprocess
import sys

import yaml

from fastmerge import cli
from fastmerge.demo import DEMO_SHAPE


def _cfg(tmp_path, fam, method="ties"):
    base, fts = fam
    d = {"merge_method": method, "base_model": str(base),
         "models": [{"model": str(f), "parameters": {"weight": 0.3, "density": 0.5}} for f in fts]}
    p = tmp_path / "cfg.yml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_merge_prints_summary(tmp_path, family_bf16, capsys):
    rc = cli.main(["merge", str(_cfg(tmp_path, family_bf16)), str(tmp_path / "out"), "--no-progress", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "merged 30 tensors" in out and "GB/s" in out and "peak RSS" in out and "tensors per backend" in out


def test_mergekit_command_line_works_by_renaming(tmp_path, family_bf16, capsys):
    argv = [str(_cfg(tmp_path, family_bf16)), str(tmp_path / "out"), "--copy-tokenizer", "--lazy-unpickle",
            "--allow-crimes", "--random-seed", "42", "--low-cpu-memory", "-j", "2", "--out-shard-size", "50K", "--quiet"]
    assert cli.yaml_main(argv) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_plan_json_and_explain(tmp_path, family_bf16, capsys):
    cfg = str(_cfg(tmp_path, family_bf16))
    assert cli.main(["plan", cfg, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["tensors"]) == 30 and doc["tensors"][0]["params"]["density"] == [0.5, 0.5, 0.5]
    assert cli.main(["plan", cfg, "--explain", "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert "-> torch" in text and "needs --device cuda" in text
    assert not (tmp_path / "out").exists()


def test_forced_backend_that_cannot_run_fails_loudly(tmp_path, family_bf16, capsys):
    rc = cli.main(["merge", str(_cfg(tmp_path, family_bf16, "sce")), str(tmp_path / "out"), "--backend", "triton", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "backend 'triton' cannot run it" in err and not (tmp_path / "out").exists()


def test_methods_and_env(capsys):
    assert cli.main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"linear", "task_arithmetic", "ties"} <= set(rows)
    ties = {p["name"]: p for p in rows["ties"]["parameters"]}
    assert ties["density"]["default"] == 1.0 and ties["weight"]["default"] == "required" and ties["normalize"]["default"] is True
    assert rows["ties"]["paper"].startswith("https://arxiv.org/")
    assert cli.main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert "native_cpu (_C)" in env and "torch" in env
    # what libgomp was given: the value, or a pointer to the user's own settings (tests/native/test_native_omp_env.py)
    assert env["omp_spincount"] == "2000" or env["omp_spincount"].startswith("not set by fastmerge")


def test_demo_runs_and_verifies(tmp_path, capsys):
    rc = cli.main(["demo", "--dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    n = len(DEMO_SHAPE.tensors())
    assert f"verified {n}/{n} output tensors bit-identical to the torch reference" in out


def test_python_dash_m(tmp_path, family_bf16):
    # cwd outside the repo: `python -m` puts the cwd first on sys.path, and we want the installed package
    r = subprocess.run([sys.executable, "-m", "fastmerge", "methods"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "ties" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(tmp_path / "missing.yml"), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "missing.yml" in r.stderr
