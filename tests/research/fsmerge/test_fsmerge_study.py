"""The FS-Merge studies' smoke runs (``fastmerge lab fsmerge_mlp --smoke`` / ``fsmerge_vit --smoke``) and
their data helpers."""

from __future__ import annotations

import torch

from fastmerge.research import lab
from fastmerge.research.fsmerge.study import MLP_METHODS, VIT_METHODS, Bench, augment, digit_halves
from helpers.mdtables import num, table


def test_digit_halves_are_two_five_way_tasks():
    a, b = digit_halves(0)
    assert a.n_classes == b.n_classes == 5
    assert set(a.y_train.tolist()) == set(range(5)) and set(b.y_test.tolist()) == set(range(5))
    # the halves partition the identity task's test split (360 images)
    assert len(a.y_test) + len(b.y_test) == 360


def test_augment_shifts_mixes_and_is_seeded():
    x = torch.zeros(3, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = augment(x, 10, seed=1)
    assert out.shape == (10, 1, 8, 8)
    assert torch.equal(out, augment(x, 10, seed=1))
    # a ±1 px shift of a 2x2 blob, λ ≥ 0.5 of it, mixed with another copy, noise 0.1: the mass stays near
    # the centre 4x4 window
    centre = out[:, :, 2:6, 2:6].sum(dim=(1, 2, 3))
    assert (centre > 2.0).all()


def test_bench_joint_accuracy_by_hand():
    # two tasks with 2 classes each; features are one-hot so head = identity picks the feature's argmax
    from fastmerge.research.lab.data import Task

    x = torch.eye(2)
    y = torch.tensor([0, 1])
    ta = Task("a", x, y, x, y, x, y, 2)
    tb = Task("b", x, y, x, y, x, y, 2)
    heads = [{"weight": torch.eye(2), "bias": torch.zeros(2)}, {"weight": torch.eye(2), "bias": torch.tensor([0.5, 0.5])}]
    per, joint, _ = Bench([ta, tb], heads).score(lambda inp: [inp, inp])
    # per-task: both heads right; joint: head b's +0.5 bias wins every argmax -> task a's images all wrong
    assert per == 1.0 and joint == 0.5


def test_mlp_study_smoke(tmp_path):
    path = lab.run("fsmerge_mlp", tmp_path / "out", tmp_path / "cache", smoke=True)
    text = path.read_text()
    assert path.name == "fsmerge_mlp.md" and "Smoke run" in text
    assert all(f"| {m} |" in text for m in MLP_METHODS)
    per, joint = table(text, "Per-task test accuracy"), table(text, "Joint test accuracy")
    depths = len(per["Method"])
    for d in range(depths):
        # the logit ensemble routes each task to its own model's head: per-task it IS the originals
        assert per["Ensemble (logits)"][d] == per["Original models"][d]
        # trained: well above the 20 % chance of a 5-way task (seeded run: 70.8 % / 49.4 %)
        assert num(per["Original models"][d]) > 30
        for m, cells in joint.items():
            if m != "Method":  # an image right over both heads' 10 logits is right over its own head's 5
                assert 0 <= num(cells[d]) <= num(per[m][d]), (m, d)


def test_vit_study_smoke(tmp_path):
    path = lab.run("fsmerge_vit", tmp_path / "out", tmp_path / "cache", smoke=True)
    text = path.read_text()
    assert path.name == "fsmerge_vit.md"
    assert all(f"| {m} |" in text for m in VIT_METHODS)
    rows = table(text, "original + ")
    cols = rows["Method"]
    per, joint, params = cols.index("Per-task (%)"), cols.index("Joint (%)"), cols.index("Learnable parameters")
    assert rows["Ensemble (logits)"][per] == rows["Original models"][per]  # each task reads its own model
    assert num(rows["Original models"][per]) > 15  # trained: above the 10 % chance of a 10-way task
    for m, cells in rows.items():
        if m != "Method" and cells[joint] != "-":  # joint over 20 logits is harder than per-task over 10
            assert 0 <= num(cells[joint]) <= num(cells[per]), m
    # a LoRA student learns fewer parameters than the full one; FS-Merge's diagonal fewer than its low-rank factors
    assert 0 < num(rows["Distillation, LoRA"][params]) < num(rows["Distillation"][params])
    assert 0 < num(rows["FS-Merge, diagonal"][params]) < num(rows["FS-Merge, low rank"][params])
