"""Every lab experiment end to end in its --smoke version (tiny models, 1-2 epochs), and the CLI."""

from __future__ import annotations

import struct

import pytest
import torch

from fastmerge.cli import main
from fastmerge.research.lab import EXPERIMENTS, describe, run
from fastmerge.research.lab.train import load_state
from helpers.mdtables import num, table

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


TEST_IMAGES = 360  # the shared test split (fastmerge.research.lab.data): an accuracy is k / 360


def _rows(t: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: v for k, v in list(t.items())[1:]}  # without the header row


def _soups(text):
    # one test split of 360 images: each model's, soup's and ensemble's accuracy is k/360, rounded to 2
    # decimals; "Perf Ave" averages 2 models (k/720); a wrong denominator or split breaks this
    for family in ("MLP", "VIT"):
        for setting in ("shared init, fixed recipe", "shared init, random hyperparameters", "independent init"):
            t = table(text, f"{family}, {setting}")
            cols = t["Models"]
            for cells in _rows(t).values():
                for col, cell in zip(cols, cells):
                    v, per = num(cell), TEST_IMAGES * (2 if col == "Perf Ave" else 1)
                    k = v * per / 100  # an integer, but for the 2-decimal rounding of v
                    assert 0 <= v <= 100 and abs(k - round(k)) <= 0.005 * per / 100 + 1e-9, (family, setting, col, v)


def _magnification(text):
    for family in ("MLP", "VIT"):
        t = table(text, f"{family}, 2 models, fixed recipe")
        cols = t["c"]
        c1, huge = dict(zip(cols, t["1"])), dict(zip(cols, t["1e+20"]))
        assert c1["xM Perf"] == c1["Perf Ave"]  # magnified by 1: the models themselves
        assert num(c1["inf/NaN models"]) == num(c1["inf/NaN soup"]) == num(c1["inf/NaN ens"]) == 0
        assert num(huge["inf/NaN models"]) == 100  # x 1e20 overflows every fp32 logit


def _templates(text):
    acc = _rows(table(text, "Accuracy (test split"))
    # linear classifiers: averaging weights is averaging logits, so soup and ensemble agree (paper Eq. 3 = 5)
    assert acc["uniform soup of seeds 0, 1"] == acc["logit ensemble of seeds 0, 1"]
    assert acc["soup of identity + hflip classifiers"] == acc["logit ensemble of identity + hflip"]
    cos = table(text, "Template vs class mean")
    own, other = (num(c) for c in cos["mean"])
    assert -1 <= other < own <= 1  # templates look like their own class mean (paper Fig. 1)


def _multitask(text):
    for family in ("MLP", "VIT"):
        t = table(text, f"{family}: test accuracy")
        cols, rows = t["method"], _rows(t)
        tasks = [i for i, c in enumerate(cols) if c not in ("chosen", "average", "normalised")]
        for m, cells in rows.items():  # "average" is the mean over the task columns
            mean = sum(num(cells[i]) for i in tasks) / len(tasks)
            assert abs(num(cells[cols.index("average")]) - mean) < 0.01, (family, m)
        assert num(rows["individual fine-tunes"][cols.index("normalised")]) == 100  # the normaliser itself
        sweep = table(text, f"{family}: rank sweep")
        full, avg = dict(zip(sweep["rank ratio"], sweep["1"])), rows["weight average"][cols.index("average")]
        # full rank: CART's residuals (deviations from the average) sum to zero -> the weight average;
        # low-rank task arithmetic at task arithmetic's λ -> task arithmetic
        assert full["CART, top"] == full["CART, reverse"] == full["CART, top, λ=1"] == avg
        assert full["TA low-rank, top"] == rows["task arithmetic"][cols.index("average")]


def _mloss(text):
    rho = _rows(table(text, "Spearman"))
    assert all(-1 <= num(c[2]) <= 1 and -1 <= num(c[3]) <= 1 for c in rho.values())
    for family in ("MLP", "VIT"):
        for group, (_, merged, ens, gap) in _rows(table(text, f"{family}: task groups")).items():
            assert abs(num(gap) - (num(ens) - num(merged))) < 0.011, (family, group)  # gap = ensemble - merged


CLAIMS = {"soups": _soups, "magnification": _magnification, "templates": _templates, "multitask": _multitask,
          "mloss": _mloss}


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
    CLAIMS[name](text)


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
