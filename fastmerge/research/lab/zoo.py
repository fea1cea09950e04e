"""The lab's model zoo: a shared "pretrained" model, one fine-tune per task, seeds, from-scratch models.

Recipe (the same for every experiment, so one cache serves them all):

- **pretrained**: the model trained on a self-supervised *pretext* task over the train images of every
  image transform: "which of the 7 transforms (identity, rot90, rot180, rot270, hflip, invert,
  block_shuffle) was applied?" (RotNet-style, 7 classes; label_perm has identity's images). Its body
  knows digit strokes in every orientation but not the digit labels, like a pretrained backbone.
- **fine-tune of task t, seed s** (LP-FT): the pretrained body + a fresh 10-class head (init seed 0),
  first a linear probe (head only, seed 0, shared by every seed), then full fine-tuning with seed s.
  Every fine-tune therefore starts from the same weights: the "shared init" regime of model soups.
- **finetuned_hp(t, s)**: the same LP-FT start with hyperparameters drawn from seed s (lr, epochs, weight
  decay), as model soups' fine-tuning runs: diverse models in one basin.
- **finetuned_body(t, s)**: the same with the linear-probe head frozen (task vectors live in the body).
- **scratch(t, s)**: the same architecture trained from a random init of seed s (the "independent init"
  regime, where weight averaging is expected to fail).
- **multitask**: the pretrained body with 8 task heads trained jointly on all tasks (the upper bound).

``Zoo(kind="mlp" | "vit", smoke=False)`` holds the config, the tasks and the recipe; ``smoke=True`` uses
a tiny model and 1-2 epochs (seconds, for CI).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .data import TASK_NAMES, Task, make_tasks
from .models import MLPConfig, ModelConfig, ViTConfig, build, with_classes
from .train import cache_key, cosine, default_cache_dir, load_state, save_state, state_hash, threads, train_cached

#: The image transforms of the pretext task (label_perm shares identity's images, so it is not one).
PRETEXT_TASKS: tuple[str, ...] = tuple(t for t in TASK_NAMES if t != "label_perm")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Epochs and learning rates of each training stage."""

    pre_epochs: int
    pre_lr: float
    lp_epochs: int
    lp_lr: float
    ft_epochs: int
    ft_lr: float
    scratch_epochs: int
    scratch_lr: float
    mt_epochs: int
    mt_lr: float
    batch_size: int = 64


# MLP: 30 fine-tuning epochs at 1e-3 reach ~97 % on identity digits (0.5 s a model on one thread);
# the ViT needs more steps and a lower rate to stay stable (~6 s for 30 epochs).
RECIPES: dict[str, Recipe] = {
    "mlp": Recipe(pre_epochs=10, pre_lr=2e-3, lp_epochs=10, lp_lr=1e-2, ft_epochs=20, ft_lr=1e-3,
                  scratch_epochs=30, scratch_lr=3e-3, mt_epochs=20, mt_lr=1e-3),
    "vit": Recipe(pre_epochs=10, pre_lr=2e-3, lp_epochs=10, lp_lr=1e-2, ft_epochs=20, ft_lr=1e-3,
                  scratch_epochs=40, scratch_lr=2e-3, mt_epochs=20, mt_lr=1e-3),
    # --smoke: 256-image batches cut the steps 4x (the pretext epoch alone is 7 x 1077 images)
    "smoke": Recipe(pre_epochs=1, pre_lr=2e-3, lp_epochs=1, lp_lr=1e-2, ft_epochs=1, ft_lr=1e-3,
                    scratch_epochs=2, scratch_lr=3e-3, mt_epochs=1, mt_lr=1e-3, batch_size=256),
}

CONFIGS: dict[str, ModelConfig] = {
    "mlp": MLPConfig(64, (128, 128), 10),
    "vit": ViTConfig(image=8, patch=2, dim=48, depth=2, heads=4, mlp_ratio=2.0, n_classes=10),
}
SMOKE_CONFIGS: dict[str, ModelConfig] = {
    "mlp": MLPConfig(64, (16, 16), 10),
    "vit": ViTConfig(image=8, patch=4, dim=16, depth=1, heads=2, mlp_ratio=2.0, n_classes=10),
}


def pretext_task(tasks: Mapping[str, Task]) -> Task:
    """The 7-way "which transform?" task over the train/val/test images of ``PRETEXT_TASKS``."""
    names = [t for t in PRETEXT_TASKS if t in tasks]
    if not names:
        raise ValueError("pretext_task: none of the image transforms is among the tasks")
    parts = {}
    for split in ("train", "val", "test"):
        xs = [tasks[n].split(split)[0] for n in names]
        ys = [torch.full((len(x),), i, dtype=torch.int64) for i, x in enumerate(xs)]
        parts[split] = (torch.cat(xs), torch.cat(ys))
    seed = next(iter(tasks.values())).seed
    return Task("pretext-" + "+".join(names), *parts["train"], *parts["val"], *parts["test"], len(names), seed)


def body(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without its ``head.*`` entries."""
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def head(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the ``head.*`` entries of a state dict."""
    return {k: v for k, v in sd.items() if k.startswith("head.")}


class MultiHead(nn.Module):
    """One body (``model`` without using its head) with one head per task: ``forward(x, task)``."""

    def __init__(self, model: nn.Module, tasks: list[str], n_classes: int):
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        dim = model.head.in_features
        self.heads = nn.ModuleDict({t: nn.Linear(dim, n_classes) for t in tasks})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.model.features(x))

    def for_task(self, task: str) -> nn.Module:
        """The single-task model: this body with ``task``'s head (shares parameters)."""
        return _TaskView(self, task)


class _TaskView(nn.Module):
    def __init__(self, mh: MultiHead, task: str):
        super().__init__()
        self.mh, self.task = mh, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mh(x, self.task)


class Zoo:
    """Trained (and cached) models of one architecture on the eight-task digits benchmark."""

    def __init__(self, kind: str = "mlp", *, cache_dir: str | Path | None = None, smoke: bool = False,
                 data_seed: int = 0, tasks: tuple[str, ...] = TASK_NAMES):
        if kind not in CONFIGS:
            raise ValueError(f"kind must be one of {sorted(CONFIGS)}, got {kind!r}")
        self.kind = kind
        self.smoke = smoke
        self.config: ModelConfig = (SMOKE_CONFIGS if smoke else CONFIGS)[kind]
        self.recipe = RECIPES["smoke" if smoke else kind]
        self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
        self.data_seed = data_seed
        self.tasks = make_tasks(data_seed, tasks)
        self._pre: dict[str, torch.Tensor] | None = None
        self._lp: dict[str, dict[str, torch.Tensor]] = {}
        self._mem: dict[tuple, dict[str, torch.Tensor]] = {}

    # -- models ------------------------------------------------------------------------------
    def pretrained(self) -> nn.Module:
        """The pretext-trained model (its head has 7 outputs; use ``body()`` of its state dict)."""
        if self._pre is None:
            r = self.recipe
            # always all seven transforms, whichever tasks this zoo evaluates: one pretrained model per config
            m = train_cached(with_classes(self.config, len(PRETEXT_TASKS)), pretext_task(self._pretext_sources()),
                             epochs=r.pre_epochs, lr=r.pre_lr, seed=0, **self._kw())
            self._pre = m.state_dict()
        m = build(with_classes(self.config, len(PRETEXT_TASKS)), 0)
        m.load_state_dict(self._pre)
        return m.eval()

    def _pretext_sources(self) -> dict[str, Task]:
        if all(t in self.tasks for t in PRETEXT_TASKS):
            return dict(self.tasks)
        return make_tasks(self.data_seed, PRETEXT_TASKS)

    def pretrained_body(self) -> dict[str, torch.Tensor]:
        """The pretrained weights without the pretext head: θ_0 of every task vector."""
        self.pretrained()
        assert self._pre is not None
        return body(self._pre)

    def probe(self, task: str) -> nn.Module:
        """Pretrained body + a linear-probe head for ``task`` (head init seed 0, trained with seed 0)."""
        if task not in self._lp:
            r = self.recipe
            m = train_cached(self.config, self.tasks[task], epochs=r.lp_epochs, lr=r.lp_lr, seed=0,
                             **self._kw(), init=self.pretrained_body(), trainable="head")
            self._lp[task] = m.state_dict()
        return self._load(self._lp[task])

    def finetuned(self, task: str, seed: int = 0) -> nn.Module:
        """LP-FT fine-tune of ``task`` with ``seed``: starts from ``probe(task)``, trains every parameter."""
        k = ("ft", task, seed)
        if k not in self._mem:
            r = self.recipe
            init = self.probe(task).state_dict()
            m = train_cached(self.config, self.tasks[task], epochs=r.ft_epochs, lr=r.ft_lr, seed=seed,
                             **self._kw(), init=init, model_seed=0)
            self._mem[k] = m.state_dict()
        return self._load(self._mem[k])

    def finetuned_body(self, task: str, seed: int = 0) -> nn.Module:
        """``task``'s fine-tune with its linear-probe head frozen (only the body trains), as task arithmetic
        fine-tunes under a fixed classifier: the task vector θ_t − θ_0 lives in the body alone, and any
        merged body can be evaluated with the task's own (unchanged) head."""
        k = ("ft_body", task, seed)
        if k not in self._mem:
            r = self.recipe
            m = train_cached(self.config, self.tasks[task], epochs=r.ft_epochs, lr=r.ft_lr, seed=seed,
                             **self._kw(), init=self.probe(task).state_dict(), model_seed=0,
                             trainable="body")
            self._mem[k] = m.state_dict()
        return self._load(self._mem[k])

    @staticmethod
    def random_hparams(seed: int) -> tuple[float, int, float]:
        """(lr, epochs, weight decay) drawn from ``seed`` as model soups draw their fine-tuning runs:
        lr log-uniform in [10^-3.5, 10^-1.5], epochs in {5, 10, 20, 40}, weight decay in {0, 1e-4, 1e-3, 1e-2}."""
        rng = random.Random(seed)
        lr = 10 ** rng.uniform(-3.5, -1.5)
        return lr, rng.choice([5, 10, 20, 40]), rng.choice([0.0, 1e-4, 1e-3, 1e-2])

    def finetuned_hp(self, task: str, seed: int = 0) -> nn.Module:
        """LP-FT fine-tune of ``task`` from ``probe(task)`` with the hyperparameters ``random_hparams(seed)``
        (and data order ``seed``): model soups' protocol, diverse models in one basin. Smoke: 1 epoch."""
        k = ("ft_hp", task, seed)
        if k not in self._mem:
            lr, epochs, wd = self.random_hparams(seed)
            if self.smoke:
                epochs = 1
            m = train_cached(self.config, self.tasks[task], epochs=epochs, lr=lr, seed=seed, weight_decay=wd,
                             **self._kw(), init=self.probe(task).state_dict(), model_seed=0)
            self._mem[k] = m.state_dict()
        return self._load(self._mem[k])

    def scratch(self, task: str, seed: int = 0) -> nn.Module:
        """``task`` trained from a random init of ``seed`` (no pretrained body)."""
        k = ("scratch", task, seed)
        if k not in self._mem:
            r = self.recipe
            m = train_cached(self.config, self.tasks[task], epochs=r.scratch_epochs, lr=r.scratch_lr, seed=seed,
                             **self._kw())
            self._mem[k] = m.state_dict()
        return self._load(self._mem[k])

    def multitask(self, tasks: tuple[str, ...] | None = None, seed: int = 0) -> MultiHead:
        """The pretrained body with one head per task, trained jointly on every task (equal batches per task):
        the multi-task upper bound of merging. Heads start from each task's linear probe."""
        names = list(tasks or self.tasks)
        r = self.recipe
        model = build(self.config, 0)
        model.load_state_dict({**model.state_dict(), **self.pretrained_body()})
        mh = MultiHead(model, names, self.config.n_classes)
        for t in names:
            mh.heads[t].load_state_dict({k[5:]: v for k, v in head(self.probe(t).state_dict()).items()})
        init = state_hash(mh.state_dict())
        probe_task = dataclasses.replace(self.tasks[names[0]], name="multitask-" + "+".join(names))
        bs = r.batch_size
        key = cache_key(self.config, probe_task, seed=seed, epochs=r.mt_epochs, lr=r.mt_lr, init=init, batch_size=bs)
        path = self.cache_dir / f"{key}.safetensors"
        if path.is_file():
            mh.load_state_dict(load_state(path))
            return mh.eval()
        n = min(len(self.tasks[t].y_train) for t in names)
        total = max(1, r.mt_epochs * ((n + bs - 1) // bs))
        with torch.random.fork_rng(devices=[]), threads(1):
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(mh.parameters(), lr=r.mt_lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(total))
            mh.train()
            for _ in range(r.mt_epochs):
                perms = {t: torch.randperm(len(self.tasks[t].y_train), generator=g) for t in names}
                for i in range(0, n, bs):
                    loss = 0.0
                    for t in names:  # one batch of every task per step: the mean of the per-task losses
                        idx = perms[t][i:i + bs]
                        loss = loss + nn.functional.cross_entropy(mh(self.tasks[t].x_train[idx], t),
                                                                  self.tasks[t].y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    (loss / len(names)).backward()
                    opt.step()
                    sched.step()
        save_state(path, mh.state_dict(), {"key": key})
        return mh.eval()

    # -- helpers -----------------------------------------------------------------------------
    def _kw(self) -> dict:
        return {"cache_dir": self.cache_dir, "batch_size": self.recipe.batch_size}

    def _load(self, sd: Mapping[str, torch.Tensor]) -> nn.Module:
        m = build(self.config, 0)
        m.load_state_dict(sd)
        return m.eval()

    def model(self, sd: Mapping[str, torch.Tensor]) -> nn.Module:
        """A model of this zoo's architecture holding ``sd`` (eval mode)."""
        return self._load(sd)
