"""Every lab experiment end to end in its --smoke version (tiny models, 1-2 epochs), and the CLI."""

from __future__ import annotations

import struct

import pytest
import torch

from fastmerge.cli import main
from fastmerge.research.lab import EXPERIMENTS, describe, run
from fastmerge.research.lab.train import load_state

# plots each experiment writes beside its table
PLOTS = {
    "soups": ["soups.png"],
    "magnification": ["magnification.png", "gap.png"],
    "templates": ["class_means.png", "templates.png", "merged_classes.png", "merged_tasks.png"],
    "multitask": ["rank_sweep.png"],
    "mloss": ["mloss.png"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # one cache for the module: the smoke zoo's pretrained model and fine-tunes are trained once
    return tmp_path_factory.mktemp("labcache")


def _png_ok(p):
    head = p.read_bytes()[:24]
    w, h = struct.unpack(">II", head[16:24])
    return head[:8] == b"\x89PNG\r\n\x1a\n" and w > 50 and h > 50


@pytest.mark.parametrize("name", list(PLOTS))
def test_smoke_experiment(name, tmp_path, cache):
    path = run(name, tmp_path, cache, smoke=True)
    assert path == tmp_path / name / f"{name}.md"
    text = path.read_text()
    assert "Smoke run" in text and "| " in text and f"fastmerge lab {name} --smoke" in text
    assert "pending" not in text  # fastmerge.mloss is present: M-TIES and M-Loss rows are real
    for png in PLOTS[name]:
        assert _png_ok(tmp_path / name / png), png
        assert f"]({png})" in text


def test_registry_lists_every_experiment():
    assert set(PLOTS) <= set(EXPERIMENTS)
    assert all(doc for _, doc in describe())


def test_cli_lab_list_and_unknown(capsys):
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PLOTS)
    assert main(["lab", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_cli_lab_smoke_run(tmp_path, cache, capsys):
    assert main(["lab", "templates", "--smoke", "--out", str(tmp_path), "--cache", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "templates" / "templates.md")


def test_runs_are_reproducible(tmp_path):
    # two cold caches: everything is retrained, and the tables agree up to the timing line
    a = run("templates", tmp_path / "a", tmp_path / "cache_a", smoke=True).read_text().splitlines()
    b = run("templates", tmp_path / "b", tmp_path / "cache_b", smoke=True).read_text().splitlines()
    strip = lambda lines: [x for x in lines if not x.startswith("Produced by")]  # noqa: E731
    assert strip(a) == strip(b)
    names = sorted(p.name for p in (tmp_path / "cache_a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cache_b").iterdir())
    for n in names:  # bit-identical weights (the files' metadata JSON order is not fixed by safetensors)
        wa, wb = load_state(tmp_path / "cache_a" / n), load_state(tmp_path / "cache_b" / n)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), n
