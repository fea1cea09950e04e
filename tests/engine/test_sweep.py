"""`rank_sweep:` in YAML (cart only): one output model per rank ratio, equal to a plain merge at that ratio."""

import pytest
import torch
import yaml

from fastmerge import cli, merge
from fastmerge.research.cart import sweep_dir_name
from fastmerge.config import MergeConfig
from fastmerge.errors import ConfigError
from fastmerge.testing import LlamaShape, make_family
from helpers.faults import count_readers, disk_full_on_write
from helpers.parity import load_model


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("sweep"), LlamaShape(hidden=48, layers=2, intermediate=96, vocab=64, heads=4),
                       n_finetunes=3, dtype="float32", shard_bytes=10**9)


def _doc(fam, **extra):
    base, fts = fam
    d = {"merge_method": "cart", "models": [{"model": str(f)} for f in fts], "parameters": {"svd": "exact"}}
    d.update(extra)
    return d


def test_yaml_rank_sweep_writes_one_model_per_ratio(tmp_path, fam, capsys):
    ratios = [0.05, 0.25]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(_doc(fam, rank_sweep=ratios)))
    assert cli.main(["merge", str(cfg), str(tmp_path / "sweep"), "--no-progress"]) == 0
    for r in ratios:
        single = _doc(fam)
        single["parameters"]["rank_ratio"] = r
        merge(single, tmp_path / f"single-{r}", progress=False)
        got, want = load_model(tmp_path / "sweep" / sweep_dir_name(r)), load_model(tmp_path / f"single-{r}")
        assert sorted(got) == sorted(want)
        for k in want:  # exact SVD: the sweep's leading columns are the single merge's factors
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k


def test_rank_sweep_is_cart_only_and_validated(fam):
    with pytest.raises(ConfigError, match="cart option"):
        MergeConfig.from_dict({**_doc(fam, rank_sweep=[0.1]), "merge_method": "linear", "parameters": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="list of rank ratios"):
        MergeConfig.from_dict(_doc(fam, rank_sweep=[0.1, 2]))


# ------------------------------------------------------------------------------------------------
# what the hand-rolled sweep loop had drifted on (fastmerge/cart.py rank_sweep at 70b977f)


def test_sweep_restores_torch_threads(tmp_path, fam):
    saved = torch.get_num_threads()
    other = 3 if saved != 3 else 2  # anything but the merge's threads=1
    torch.set_num_threads(other)
    try:
        merge(_doc(fam, rank_sweep=[0.05]), tmp_path / "s", progress=False, threads=1)
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(saved)


def test_sweep_closes_its_readers(tmp_path, fam, monkeypatch):
    opened, closed = count_readers(monkeypatch)
    merge(_doc(fam, rank_sweep=[0.05, 0.25]), tmp_path / "s", progress=False)
    assert opened and sorted(set(closed)) == sorted(opened)
    opened.clear(), closed.clear()
    disk_full_on_write(monkeypatch, at=3)
    with pytest.raises(Exception):
        merge(_doc(fam, rank_sweep=[0.05, 0.25]), tmp_path / "t", progress=False)
    assert opened and sorted(set(closed)) == sorted(opened)


def test_sweep_oserror_is_one_output_error_line(tmp_path, fam, monkeypatch):
    from fastmerge.errors import OutputError

    disk_full_on_write(monkeypatch, at=3)
    with pytest.raises(OutputError) as ei:
        merge(_doc(fam, rank_sweep=[0.05, 0.25]), tmp_path / "s", progress=False)
    assert "\n" not in str(ei.value) and "No space left on device" in str(ei.value)
    assert not (tmp_path / "s").exists()  # no rank-* folder, no temporary directory, no empty OUT
