"""fastmerge.research.lab.data and models: splits, task transforms (checked against hand-made transforms), shapes."""

from __future__ import annotations

import pytest
import torch

from fastmerge.research.lab.data import TASK_NAMES, block_shuffle, flat, images, make_task, make_tasks, raw_splits
from fastmerge.research.lab.models import MLP, MLPConfig, TinyViT, ViTConfig, build, with_classes


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(0)


def test_eight_tasks_same_split(tasks):
    assert tuple(tasks) == TASK_NAMES and len(TASK_NAMES) == 8
    for t in tasks.values():
        assert t.x_train.shape == (1077, 1, 8, 8) and t.x_val.shape == (360, 1, 8, 8) and t.x_test.shape == (360, 1, 8, 8)
        assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64 and t.n_classes == 10
        # standardised with the train split's scalar mean and std
        assert abs(float(t.x_train.mean())) < 1e-5 and abs(float(t.x_train.std()) - 1) < 1e-5


def test_split_is_stratified_and_disjoint():
    raw = raw_splits(0)
    counts = {k: torch.bincount(y, minlength=10) for k, (_, y) in raw.items()}
    # 1797 digits, ~180 a class: each split holds its share of every class within one example
    for k, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        total = torch.bincount(torch.cat([y for _, y in raw.values()]), minlength=10).float()
        assert ((counts[k].float() - frac * total).abs() <= 1.5).all(), k
    rows = {k: {tuple(r.flatten().tolist()) for r in x} for k, (x, _) in raw.items()}
    # load_digits has a few duplicate images, so only near-disjointness is checkable on the pixels
    assert len(rows["train"] & rows["test"]) < 10


def test_splits_are_fixed_by_seed():
    a, b, c = make_task("identity", 0), make_task("identity", 0), make_task("identity", 1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_task_transforms_by_hand(tasks):
    raw_x, raw_y = raw_splits(0)["train"]
    ident = tasks["identity"]

    def same_up_to_scale(a, b):  # each task is standardised with its own two scalars
        za = (a - a.mean()) / a.std()
        zb = (b - b.mean()) / b.std()
        return torch.allclose(za, zb, atol=1e-5)

    img = raw_x[0, 0]
    # rot90: counter-clockwise, the first row of the rotated image is the last column of the original
    assert torch.allclose(torch.rot90(img, 1, (0, 1))[0], img[:, -1])
    assert same_up_to_scale(tasks["rot90"].x_train, torch.rot90(raw_x, 1, (2, 3)))
    assert same_up_to_scale(tasks["rot180"].x_train, raw_x.flip(2).flip(3))
    assert same_up_to_scale(tasks["hflip"].x_train, raw_x[..., torch.arange(7, -1, -1)])
    assert same_up_to_scale(tasks["invert"].x_train, 1 - raw_x)
    assert torch.equal(tasks["label_perm"].x_train, ident.x_train)
    perm = {}
    for a, b in zip(raw_y.tolist(), tasks["label_perm"].y_train.tolist()):
        assert perm.setdefault(a, b) == b  # one fixed relabelling
    assert sorted(perm.values()) == list(range(10)) and all(k != v for k, v in perm.items())  # a derangement
    for name in ("identity", "rot90", "hflip", "invert", "block_shuffle"):
        assert torch.equal(tasks[name].y_train, raw_y)


def test_block_shuffle_by_hand():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    perm = torch.arange(16).roll(1)  # output block b = input block b - 1: block 0 <- block 15
    y = block_shuffle(x, perm)
    assert torch.equal(y[0, 0, :2, :2], x[0, 0, 6:, 6:])  # block 15 is the bottom-right 2x2
    assert torch.equal(y[0, 0, :2, 2:4], x[0, 0, :2, :2])
    assert torch.equal(block_shuffle(x, torch.arange(16)), x)


def test_flat_and_images_roundtrip(tasks):
    x = tasks["identity"].x_val
    assert flat(x).shape == (360, 64) and torch.equal(images(flat(x)), x)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_tasks(0, ("identity", "rot45"))


@pytest.mark.parametrize("cfg", [MLPConfig(64, (16, 8), 10), ViTConfig(8, 2, 16, 2, 2, 2.0, 10), ViTConfig(8, 4, 16, 1, 4)])
def test_models_features_and_head(cfg):
    m = build(cfg, 3).eval()
    x = torch.randn(5, 1, 8, 8)
    out = m(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(m.head(m.features(x)), out)
    assert m.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), build(cfg, 3).state_dict().values()))
    assert not torch.equal(next(iter(m.state_dict().values())), next(iter(build(cfg, 4).state_dict().values())))


def test_model_parameter_names():
    assert list(MLP(64, [16, 8], 10).state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                                       "head.weight", "head.bias"]
    names = list(TinyViT(8, 2, 16, 1, 2).state_dict())
    for n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight", "head.weight"):
        assert n in names
    assert MLP(64, [16], 10)(torch.randn(3, 64)).shape == (3, 10)  # flattened rows too
    assert with_classes(MLPConfig(), 7).n_classes == 7
