"""fastmerge.research.lab.train and zoo: deterministic training, the checkpoint cache, the smoke zoo."""

from __future__ import annotations

import pytest
import torch

from fastmerge.research.lab.data import make_tasks
from fastmerge.research.lab.models import MLPConfig, build
from fastmerge.research.lab.train import accuracy, evaluate, train, train_cached
from fastmerge.research.lab.zoo import PRETEXT_TASKS, Zoo, body, pretext_task

CFG = MLPConfig(64, (16,), 10)


@pytest.fixture(scope="module")
def task():
    return make_tasks(0, ("identity",))["identity"]


def test_training_is_deterministic_and_learns(task):
    before = torch.get_num_threads()
    a = train(build(CFG, 0), task, epochs=3, lr=1e-2, seed=5)
    b = train(build(CFG, 0), task, epochs=3, lr=1e-2, seed=5)
    c = train(build(CFG, 0), task, epochs=3, lr=1e-2, seed=6)
    assert torch.get_num_threads() == before  # the single-thread context is restored
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert evaluate(a, task) > 0.8  # 3 epochs of a 16-unit MLP on the digits (chance: 0.1)
    assert not a.training


def test_trainable_head_only(task):
    m0 = build(CFG, 1)
    m = train(build(CFG, 1), task, epochs=1, lr=1e-2, seed=0, trainable=lambda n: n.startswith("head."))
    assert torch.equal(m.fc1.weight, m0.fc1.weight) and not torch.equal(m.head.weight, m0.head.weight)
    assert all(p.requires_grad for p in m.parameters())  # flags restored


def test_accuracy_by_hand():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.5, 0.5], [0.0, 3.0]])
    assert accuracy(logits, torch.tensor([1, 0, 1, 0])) == 0.5  # the tie [0.5, 0.5] goes to class 0


def test_cache_roundtrip(tmp_path, task):
    a = train_cached(CFG, task, epochs=1, lr=1e-2, seed=0, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("mlp-identity-s0-e1-")
    with torch.no_grad():  # a cache hit loads the file: poison it to prove the second call reads it
        from safetensors.torch import load_file, save_file

        sd = load_file(str(files[0]))
        sd["head.bias"] = torch.full_like(sd["head.bias"], 7.0)
        save_file(sd, str(files[0]))
    b = train_cached(CFG, task, epochs=1, lr=1e-2, seed=0, cache_dir=tmp_path)
    assert torch.equal(b.head.bias, torch.full((10,), 7.0)) and torch.equal(a.fc1.weight, b.fc1.weight)
    train_cached(CFG, task, epochs=1, lr=1e-2, seed=1, cache_dir=tmp_path)
    train_cached(CFG, task, epochs=1, lr=1e-2, seed=0, cache_dir=tmp_path, init=body(a.state_dict()))
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # seed and init are part of the key


def test_cache_env_default(tmp_path, monkeypatch, task):
    monkeypatch.setenv("FASTMERGE_LAB_CACHE", str(tmp_path / "env"))
    train_cached(CFG, task, epochs=1, lr=1e-2, seed=0)
    assert len(list((tmp_path / "env").glob("*.safetensors"))) == 1


def test_smoke_zoo(tmp_path):
    zoo = Zoo("mlp", cache_dir=tmp_path, smoke=True, tasks=("identity", "label_perm"))
    pre = zoo.pretrained()
    assert pre.head.out_features == len(PRETEXT_TASKS) == 7
    ft = zoo.finetuned("identity", 0)
    fb = zoo.finetuned_body("label_perm", 0)
    probe = zoo.probe("label_perm")
    assert torch.equal(fb.head.weight, probe.head.weight)  # frozen head
    assert not torch.equal(fb.fc1.weight, probe.fc1.weight)
    for k, v in zoo.pretrained_body().items():  # the probe keeps the pretrained body
        assert torch.equal(probe.state_dict()[k], v)
    assert ft.head.out_features == 10
    mt = zoo.multitask()
    assert 0.0 <= evaluate(mt.for_task("identity"), zoo.tasks["identity"]) <= 1.0
    assert zoo.random_hparams(3) == Zoo.random_hparams(3)
    pt = pretext_task(make_tasks(0, PRETEXT_TASKS))
    assert pt.n_classes == 7 and len(pt.y_train) == 7 * 1077
