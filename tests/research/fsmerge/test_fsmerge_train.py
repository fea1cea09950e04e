"""FS-Merge training, the baselines and saving, on tiny synthetic models (seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastmerge.research.fsmerge import (BertSpec, MLPSpec, TrainConfig, ViTSpec, average, build_supernet, canonical_fp32,
                               distill, features, fold, fs_merge, fs_merge_sequential, regmean, save_folded, zipit,
                               zipit_match)
from fastmerge.research.fsmerge.baselines import Student, feature_ensemble
from fastmerge.research.fsmerge.train import make_targets, train_local
from fsm_models import bert_inputs, bert_sd, mlp_sd, vit_sd

SGD = TrainConfig(steps=60, batch_size=None, lr=0.05, optimizer="sgd", momentum=0.9, schedule="constant")


def _recon_error(spec, sds, folded, data) -> float:
    """Routed reconstruction error of a folded merge: task k's features ``f(x) U_k`` vs model k's."""
    c = canonical_fp32(spec, folded.state_dict)
    err = 0.0
    for k, x in enumerate(data):
        target = features(spec, canonical_fp32(spec, sds[k]), x)
        err += float(((features(spec, c, x) @ folded.unmerge[k] - target) ** 2).mean())
    return err


@pytest.mark.parametrize("mode,init", [("global", "average"), ("global", "first"), ("local", "random"), ("local", "zipit")])
def test_mlp_fs_merge_reduces_reconstruction_error(mode, init):
    sds = [mlp_sd(s) for s in range(2)]
    spec = MLPSpec.from_state_dict(sds[0])
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)]
    res = fs_merge(spec, sds, data, rank="full", init=init, mode=mode, routed=False, train=SGD)
    assert res.history[-1][1] < res.history[0][1]
    before = fold(build_supernet(spec, sds, rank="full", init=init if init != "random" else "average",
                                 data=torch.cat(data)), sds)
    if mode == "global":
        assert _recon_error(spec, sds, res.folded, data) < _recon_error(spec, sds, before, data)
    assert sorted(res.folded.state_dict) == sorted(k for k in sds[0] if not k.startswith("head"))


def test_local_stacked_path_equals_per_layer_path():
    # equal widths + dense factors train as one batched problem, other MLPs layer by layer: the same
    # maths, so forcing the per-layer path (widths only steer that choice) must give the same factors
    sds = [mlp_sd(s, dims=(10, 8, 8)) for s in range(2)]
    spec = MLPSpec.from_state_dict(sds[0])
    x = torch.randn(12, 10)
    canons = [canonical_fp32(spec, s) for s in sds]
    a = build_supernet(spec, sds, rank="full", init="random", seed=3)
    b = build_supernet(spec, sds, rank="full", init="random", seed=3)
    train_local(a, canons, x, SGD)
    b.widths = [8, 9]
    train_local(b, canons, x, SGD)
    moved = 0.0
    for k in a.factors:
        torch.testing.assert_close(a.f(k).full, b.f(k).full, rtol=1e-4, atol=1e-5)
        moved += float((a.f(k).full - build_supernet(spec, sds, rank="full", init="random", seed=3).f(k).full).detach().abs().max())
    assert moved > 1e-3  # and training did move them


def test_merging_a_model_with_itself_survives_training():
    # "first" init on (A, A): the reconstruction is exact, the loss ~0 and so is every gradient; SGD with
    # wd = 0 leaves the model where it is (to fp32 rounding of the two forward paths)
    sd = vit_sd(4)
    spec = ViTSpec.from_state_dict(sd, heads=3, patch=2)
    x = torch.randn(8, 1, 8, 8)
    res = fs_merge(spec, [sd, sd], [x, x], rank=2, init="first", train=SGD)
    assert res.history[0][1] < 1e-10
    for k, v in res.folded.state_dict.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=1e-6)


def test_vit_global_routed_training_reduces_loss():
    sds = [vit_sd(s) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    data = [torch.randn(12, 1, 8, 8), torch.randn(12, 1, 8, 8)]
    res = fs_merge(spec, sds, data, rank=2, init="first", train=TrainConfig(steps=40, batch_size=8, lr=1e-2))
    assert res.history[-1][1] < 0.7 * res.history[0][1]
    assert len(res.folded.unmerge) == 2


def test_bert_global_training_runs_and_folds():
    sds = [bert_sd(s) for s in range(2)]
    spec = BertSpec.from_state_dict(sds[0], heads=3)
    data = [bert_inputs(1, batch=6), bert_inputs(2, batch=6)]
    res = fs_merge(spec, sds, data, rank=1, init="first", train=TrainConfig(steps=15, batch_size=6, lr=1e-2))
    assert res.history[-1][1] < res.history[0][1]
    c = canonical_fp32(spec, res.folded.state_dict)
    torch.testing.assert_close(features(spec, c, data[0]), res.supernet(data[0])[0].detach(), rtol=1e-4, atol=1e-5)


def test_sequential_merges_three_models_two_at_a_time():
    sds = [vit_sd(s) for s in range(3)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    data = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    res = fs_merge_sequential(spec, sds, data, rank=2, train=TrainConfig(steps=10, batch_size=8, lr=1e-2))
    assert res.supernet.n == 2 and res.supernet.n_out == 3  # two models' weights, three tasks
    assert len(res.folded.unmerge) == 3
    assert set(res.folded.state_dict) == {k for k in sds[0] if not k.startswith("head")}
    assert all(v.dtype == torch.float32 for v in res.folded.state_dict.values())


def test_sequential_carries_the_earlier_task_blocks():
    from fastmerge.research.fsmerge.supernet import Factor
    from fastmerge.research.fsmerge.train import _carry_unmerge

    prev, new = Factor("unmerge", 2, 4, 2), Factor("unmerge", 3, 4, 2)
    with torch.no_grad():
        for p in list(prev.parameters()) + list(new.parameters()):
            p.normal_()
    new.diag.data[2] = 1.0
    _carry_unmerge(prev, new)
    torch.testing.assert_close(new.blocks()[:2], prev.blocks())
    torch.testing.assert_close(new.blocks()[2], torch.eye(4, dtype=torch.float64))


def test_normalized_targets_leave_predictions_in_the_models_scale():
    sds = [mlp_sd(s) for s in range(2)]
    sds[1] = {k: v * (3.0 if k.startswith("fc3") else 1.0) for k, v in sds[1].items()}  # model 2's features 3x larger
    spec = MLPSpec.from_state_dict(sds[0])
    x = [torch.randn(10, 10), torch.randn(10, 10)]
    canons = [canonical_fp32(spec, s) for s in sds]
    tg = make_targets(spec, canons, x, routed=True, normalize=True)
    assert tg.scale[1] < tg.scale[0] / 2
    res = fs_merge(spec, sds, x, rank="full", init="first", routed=True, normalize_targets=True,
                   train=TrainConfig(steps=1, lr=0.0, batch_size=None, optimizer="sgd", schedule="constant"))
    # no training (lr 0): U_final = I / s_k·s_k = I, the "first" model exactly
    torch.testing.assert_close(res.folded.unmerge[1], torch.eye(9), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------- baselines


def test_zipit_match_by_hand():
    # neurons 0 and 3 identical, 1 and 2 identical: they pair up, each merged neuron averages its pair
    t = torch.linspace(0, 1, 20)
    a, b = torch.sin(7 * t), torch.cos(3 * t)
    m = zipit_match(torch.stack([a, b, b, a], dim=1), 2)
    pairs = sorted(tuple(int(i) for i in torch.nonzero(m[:, p]).flatten()) for p in range(2))
    assert pairs == [(0, 3), (1, 2)]
    assert set(m[m != 0].tolist()) == {0.5}


def test_zipit_fold_equals_averaging_the_matched_neurons():
    sds = [mlp_sd(s, dims=(6, 5)) for s in range(2)]
    spec = MLPSpec.from_state_dict(sds[0])
    x = [torch.randn(20, 6), torch.randn(20, 6)]
    folded = zipit(spec, sds, x)
    acts = torch.cat([torch.relu(torch.cat(x) @ s["fc1.weight"].T + s["fc1.bias"]) for s in sds], dim=1)
    m = zipit_match(acts, 5)
    w = torch.cat([sds[0]["fc1.weight"], sds[1]["fc1.weight"]])
    bias = torch.cat([sds[0]["fc1.bias"], sds[1]["fc1.bias"]])
    for p in range(5):
        i, j = torch.nonzero(m[:, p]).flatten().tolist()
        torch.testing.assert_close(folded.state_dict["fc1.weight"][p], (w[i] + w[j]) / 2)
        torch.testing.assert_close(folded.state_dict["fc1.bias"][p], (bias[i] + bias[j]) / 2)
    # U = 2Mᵀ: model k's neuron i reads the merged neuron its pair became
    u0 = folded.unmerge[0]
    for i in range(5):
        p = int(torch.nonzero(m[i]).flatten())
        assert u0[p, i] == 1.0 and u0[:, i].abs().sum() == 1.0


def test_regmean_equals_least_squares():
    # α = 1: W = argmin Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖² (Jin et al., Eq. 18-19), a plain least-squares problem
    sds = [mlp_sd(s, dims=(6, 4)) for s in range(2)]
    spec = MLPSpec.from_state_dict(sds[0])
    x = [torch.randn(30, 6, dtype=torch.float64), torch.randn(25, 6, dtype=torch.float64)]
    folded = regmean(spec, sds, [v.float() for v in x], alpha=1.0)
    a = torch.cat(x)
    y = torch.cat([x[k] @ sds[k]["fc1.weight"].double().T for k in range(2)])
    w = torch.linalg.lstsq(a, y).solution.T
    torch.testing.assert_close(folded.state_dict["fc1.weight"].double(), w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.state_dict["fc1.bias"], (sds[0]["fc1.bias"] + sds[1]["fc1.bias"]) / 2)
    with pytest.raises(ValueError, match="alpha"):
        regmean(spec, sds, x, alpha=1.5)


def test_average_is_the_mean_of_the_backbones():
    sds = [vit_sd(s, dtype=torch.bfloat16) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    folded = average(spec, sds)
    for k, v in folded.state_dict.items():
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v, ((sds[0][k].float() + sds[1][k].float()) / 2).bfloat16(), rtol=0, atol=0)


def test_lora_student_folds_exactly():
    sds = [vit_sd(s) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    st = Student(spec, canonical_fp32(spec, sds[0]), 2, lora_rank=2)
    with torch.no_grad():
        for p in st.lora.values():
            p.normal_(0, 0.2)
    assert all(not p.requires_grad for p in st.params.values())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(features(spec, st.merged_canon(), x), st(x)[0].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [None, 2])
def test_distillation_reduces_loss(lora):
    sds = [vit_sd(s) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    data = [torch.randn(12, 1, 8, 8), torch.randn(12, 1, 8, 8)]
    folded, hist, _ = distill(spec, sds, data, lora_rank=lora, train=TrainConfig(steps=30, batch_size=8, lr=1e-2))
    assert hist[-1][1] < hist[0][1]
    assert set(folded.state_dict) == {k for k in sds[0] if not k.startswith("head")}


def test_feature_ensemble_of_identical_models_is_the_model():
    sd = vit_sd(2)
    spec = ViTSpec.from_state_dict(sd, heads=3, patch=2)
    x = torch.randn(4, 1, 8, 8)
    out = feature_ensemble(spec, [sd, sd], x)
    torch.testing.assert_close(out[0], features(spec, canonical_fp32(spec, sd), x))


# --------------------------------------------------------------------------------------- saving, errors


def test_save_folded_writes_the_original_layout(tmp_path):
    sds = [vit_sd(s, dtype=torch.bfloat16) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    sn = build_supernet(spec, sds, rank=2, init="first")
    folded = fold(sn, sds)
    heads = [{"weight": s["head.weight"], "bias": s["head.bias"]} for s in sds]
    out = save_folded(folded, tmp_path / "m", heads=heads, shard_bytes=4_000, meta={"rank": 2})
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    loaded = {}
    for f in sorted(set(idx["weight_map"].values())):
        loaded.update(load_file(str(out / f)))
    assert set(loaded) == set(folded.state_dict)
    for k, v in loaded.items():
        assert v.dtype == torch.bfloat16 and v.shape == sds[0][k].shape and torch.equal(v, sds[0][k])
    tasks = load_file(str(out / "fsmerge_tasks.safetensors"))
    assert torch.equal(tasks["task1.head.weight"], sds[1]["head.weight"])  # U = I at "first" init
    assert json.loads((out / "fsmerge.json").read_text())["rank"] == 2
    with pytest.raises(Exception, match="exists"):
        save_folded(folded, out)


def test_fs_merge_errors():
    sds = [vit_sd(s) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="one per model"):
        fs_merge(spec, sds, [x])
    with pytest.raises(ValueError, match="MLPs"):
        fs_merge(spec, sds, [x, x], mode="local", train=SGD)
    with pytest.raises(ValueError, match="mode"):
        fs_merge(spec, sds, [x, x], mode="blockwise")
    with pytest.raises(ValueError, match="optimizer"):
        fs_merge(spec, sds, [x, x], train=TrainConfig(steps=1, optimizer="lbfgs"))
    with pytest.raises(ValueError, match="init"):
        distill(spec, sds, [x, x], init="random")
