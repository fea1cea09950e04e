"""`slices`: layer ranges renumbered in the output, per-slice base and parameters, precedence, gradients
over each slice's layers; parity with mergekit 0.1.5 on the same configs."""

import importlib.util
import json

import pytest
import torch

from fastmerge import merge, plan
from fastmerge.config import MergeConfig
from fastmerge.errors import ConfigError
from fastmerge.testing import LlamaShape, make_family
from helpers.parity import assert_bit_exact, compare_models, load_model, run_mergekit

SHAPE = LlamaShape(hidden=32, layers=4, intermediate=48, vocab=64, heads=2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("slices"), SHAPE, n_finetunes=2, dtype="float32", shard_bytes=30_000)


def _frank(fam):
    """A 'frankenmerge' with a duplicated range: ft1 layers 0-2, then ft2 layers 1-3 -> 6 output layers."""
    base, (ft1, ft2) = fam
    return {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": str(ft1), "layer_range": [0, 3], "parameters": {"weight": 1.0}}]},
            {"sources": [{"model": str(ft2), "layer_range": [1, 4], "parameters": {"weight": 1.0}}]},
        ],
    }


def test_layers_renumbered_and_copied(tmp_path, fam):
    base, (ft1, ft2) = fam
    merge(_frank(fam), tmp_path / "out", progress=False)
    got = load_model(tmp_path / "out")
    a, b = load_model(ft1), load_model(ft2)
    n = "model.layers.{}.mlp.up_proj.weight"
    for out_i, (src, src_i) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        assert torch.equal(got[n.format(out_i)], src[n.format(src_i)])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # last slice
    assert not any(".layers.6." in k for k in got) and len(got) == 6 * 9 + 3
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_plan_order_pre_layers_post(fam):
    names = [t.name for t in plan(_frank(fam)).tensors]
    assert names[0] == "model.embed_tokens.weight" and names[-1] in ("lm_head.weight", "model.norm.weight")
    layer_of = [int(n.split(".")[2]) for n in names if ".layers." in n]
    assert layer_of == sorted(layer_of)


def test_precedence_and_gradient_per_slice(fam):
    base, (ft1, ft2) = fam
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"density": 0.9, "weight": 0.2},
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 2]},
                         {"model": str(ft1), "layer_range": [0, 2], "parameters": {"density": 0.3}},
                         {"model": str(ft2), "layer_range": [0, 2]}],
             "parameters": {"density": 0.5, "weight": [0.0, 1.0]}},
            {"sources": [{"model": str(base), "layer_range": [2, 4]},
                         {"model": str(ft1), "layer_range": [2, 4]},
                         {"model": str(ft2), "layer_range": [2, 4]}]},
        ],
    }
    by = {t.name: t.params for t in plan(cfg).tensors}
    q = "model.layers.{}.self_attn.q_proj.weight"
    # slice 0: source > slice > global; the gradient runs over the slice's own 2 layers (t = 0, 1)
    assert by[q.format(0)].density == (0.3, 0.5) and by[q.format(0)].weight == (0.0, 0.0)
    assert by[q.format(1)].weight == (1.0, 1.0)
    # slice 1: only global values
    assert by[q.format(2)].density == (0.9, 0.9) and by[q.format(3)].weight == (0.2, 0.2)


@pytest.mark.parametrize(
    "slices,msg",
    [
        ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}], "same number of layers"),
        ([{"sources": [{"model": "a", "layer_range": [2, 2]}]}], "layer_range"),
        ([{"sources": [{"model": "a"}]}], "layer_range"),
        ([{"sources": [{"model": "a", "layer_range": [0, 1]}], "residual_weight": "x"}], "residual_weight"),
    ],
)
def test_slice_validation(slices, msg):
    with pytest.raises(ConfigError, match=msg):
        MergeConfig.from_dict({"merge_method": "linear", "slices": slices, "parameters": {"weight": 1.0}})


def test_base_must_be_a_source(fam):
    base, (ft1, ft2) = fam
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"weight": 1.0},
           "slices": [{"sources": [{"model": str(ft1), "layer_range": [0, 2]}]}]}
    with pytest.raises(ConfigError, match="must be one of the slice's sources"):
        MergeConfig.from_dict(cfg)


def test_layer_out_of_range_names_model(fam):
    base, (ft1, ft2) = fam
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "slices": [{"sources": [{"model": str(ft1), "layer_range": [2, 6]}]}]}
    with pytest.raises(Exception, match="does not have|missing"):
        plan(cfg)


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit==0.1.5 is not installed")
def test_parity_with_mergekit(tmp_path, fam):
    base, (ft1, ft2) = fam
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"density": 0.5, "weight": [{"filter": "mlp", "value": 0.4}, {"value": 0.3}]},
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 2]},
                         {"model": str(ft1), "layer_range": [0, 2], "parameters": {"density": 0.3}},
                         {"model": str(ft2), "layer_range": [0, 2]}],
             "parameters": {"weight": [0.1, 0.9]}},
            {"sources": [{"model": str(base), "layer_range": [1, 4]},
                         {"model": str(ft1), "layer_range": [1, 4]},
                         {"model": str(ft2), "layer_range": [1, 4]}]},
        ],
    }
    mk = load_model(run_mergekit(cfg, tmp_path / "mk"))
    merge(cfg, tmp_path / "fm", mergekit_compat=True, progress=False, copy_tokenizer=False)
    fm = load_model(tmp_path / "fm")
    assert_bit_exact(compare_models(fm, mk), "ties with slices (compat)")
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    fm_cfg = json.loads((tmp_path / "fm" / "config.json").read_text())
    assert fm_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"] == 5
