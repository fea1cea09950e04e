"""The lab's data: scikit-learn's 8x8 digits (ships with sklearn, nothing downloaded) and eight task variants.

``load_digits`` has 1797 images of 8x8 pixels, intensities 0..16, ten balanced classes (~180 each).
One stratified split, fixed by ``seed``, is shared by every task: 60 % train (1077), 20 % val (360),
20 % test (360). Images are scaled to [0, 1] and then standardised with the *train* split's global
mean and standard deviation (one scalar each, so that pixel templates keep their spatial contrast).

The eight tasks (``TASK_NAMES``) apply one fixed transform to the same images:

    identity        the digits as they are
    rot90/180/270   rotated by 90/180/270 degrees (counter-clockwise, ``torch.rot90`` on H, W)
    hflip           mirrored left-right
    invert          intensity inversion, 1 - x on the [0, 1] image (before standardisation)
    block_shuffle   the 16 2x2 pixel blocks permuted by a fixed permutation (from ``seed`` + 1)
    label_perm      the images unchanged, labels relabelled by a fixed derangement (from ``seed`` + 2)

Images are ``[N, 1, 8, 8]`` float32 tensors; ``flat(x)`` gives ``[N, 64]`` for the MLP.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

TASK_NAMES: tuple[str, ...] = (
    "identity", "rot90", "rot180", "rot270", "hflip", "invert", "block_shuffle", "label_perm",
)

#: Fractions of the 1797 images in train / val / test (the rest of 1 - 0.2 - 0.2 is train).
VAL_FRACTION = 0.2
TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Task:
    """One classification task: images ``[N, 1, 8, 8]`` float32, labels ``[N]`` int64, per split."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    seed: int = 0  # the split seed (part of the checkpoint cache key)

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of ``split`` ("train" | "val" | "test")."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")


def flat(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 8, 8]`` images -> ``[N, 64]`` rows (row-major pixels, the MLP's input)."""
    return x.reshape(x.shape[0], -1)


def images(x: torch.Tensor, side: int = 8) -> torch.Tensor:
    """``[N, side*side]`` rows -> ``[N, 1, side, side]`` images (inverse of ``flat``)."""
    return x.reshape(x.shape[0], 1, side, side)


def _block_perm(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(16, generator=g)


def _label_perm(seed: int, n: int = 10) -> torch.Tensor:
    # A derangement (no label keeps its index), so the task really differs from identity on every class.
    g = torch.Generator().manual_seed(seed + 2)
    while True:
        p = torch.randperm(n, generator=g)
        if not bool((p == torch.arange(n)).any()):
            return p


def block_shuffle(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute the 16 2x2 blocks of ``[N, 1, 8, 8]`` images: block b of the output is block perm[b] of the input."""
    n = x.shape[0]
    blocks = x.reshape(n, 1, 4, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, 1, 16, 2, 2)
    blocks = blocks[:, :, perm]
    return blocks.reshape(n, 1, 4, 4, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, 1, 8, 8)


def _transforms(seed: int) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]:
    """task -> (image transform on [0, 1] images, label transform)."""
    same = lambda t: t  # noqa: E731
    bp, lp = _block_perm(seed), _label_perm(seed)
    return {
        "identity": (same, same),
        "rot90": (lambda x: torch.rot90(x, 1, (2, 3)), same),
        "rot180": (lambda x: torch.rot90(x, 2, (2, 3)), same),
        "rot270": (lambda x: torch.rot90(x, 3, (2, 3)), same),
        "hflip": (lambda x: torch.flip(x, (3,)), same),
        "invert": (lambda x: 1.0 - x, same),
        "block_shuffle": (lambda x: block_shuffle(x, bp), same),
        "label_perm": (same, lambda y: lp[y]),
    }


@functools.lru_cache(maxsize=4)
def raw_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The stratified split of the digits in [0, 1], before any task transform or standardisation:
    {"train" | "val" | "test": (images [N, 1, 8, 8] float32, labels [N] int64)}.
    Cached per seed: callers must not modify the returned tensors (task transforms make new ones)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=y.numpy(), random_state=seed)
    train, val = train_test_split(
        rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), stratify=y[rest].numpy(), random_state=seed
    )
    return {k: (x[v], y[v]) for k, v in (("train", train), ("val", val), ("test", test))}


def make_tasks(seed: int = 0, names: tuple[str, ...] = TASK_NAMES) -> dict[str, Task]:
    """The eight-task benchmark (or the ``names`` subset), all on the same stratified split of ``seed``."""
    raw = raw_splits(seed)
    tf = _transforms(seed)
    out: dict[str, Task] = {}
    for name in names:
        if name not in tf:
            raise ValueError(f"unknown task {name!r} (tasks: {', '.join(TASK_NAMES)})")
        fx, fy = tf[name]
        parts = {k: (fx(x), fy(y)) for k, (x, y) in raw.items()}
        # standardise with the transformed train split's scalars: inversion changes the mean (0.30 -> 0.70)
        mean = parts["train"][0].mean()
        std = parts["train"][0].std()
        norm = {k: ((x - mean) / std, y) for k, (x, y) in parts.items()}
        out[name] = Task(
            name,
            norm["train"][0].contiguous(), norm["train"][1].contiguous(),
            norm["val"][0].contiguous(), norm["val"][1].contiguous(),
            norm["test"][0].contiguous(), norm["test"][1].contiguous(),
            10,
            seed,
        )
    return out


def make_task(name: str = "identity", seed: int = 0) -> Task:
    """One task of the benchmark."""
    return make_tasks(seed, (name,))[name]
