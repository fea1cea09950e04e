"""Seeded, deterministic training and evaluation of the lab's models, with a safetensors checkpoint cache.

Determinism: ``train`` seeds torch from ``seed`` (forked RNG, the caller's state is untouched), shuffles
with its own ``torch.Generator`` and runs with a fixed thread count (default 1: CPU GEMM blocking, hence
float summation order, can depend on the thread count). The same call gives bit-identical weights.

The cache (``train_cached``) keys a checkpoint on everything that determines it: the model config, the
task (name, split seed and a hash of its training data), the init weights (a hash of their bytes), the training seed, epochs, learning
rate, batch size, weight decay and which parameters train. Files are written atomically
(``<key>.safetensors`` under ``cache_dir``, default ``$FASTMERGE_LAB_CACHE`` or ``~/.cache/fastmerge/lab``),
so concurrent runs can share a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .data import Task
from .models import ModelConfig, build

#: Bump when the training recipe changes in a way the key does not capture (invalidates old checkpoints).
RECIPE_VERSION = 1


def default_cache_dir() -> Path:
    """``$FASTMERGE_LAB_CACHE`` if set, else ``~/.cache/fastmerge/lab``."""
    env = os.environ.get("FASTMERGE_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastmerge" / "lab"


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (n <= 0: leave as is), restoring the old count after."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cosine(total: int) -> Callable[[int], float]:
    """The LR factor at step s: 0.5·(1 + cos(π·s/total)), evaluated in fp32 (``RECIPE_VERSION`` 1 checkpoints
    were trained with exactly this rounding: changing it changes every weight)."""
    return lambda s: 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * s / total)).item())


def train(
    model: nn.Module,
    task: Task,
    epochs: int,
    lr: float,
    seed: int,
    *,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    trainable: Callable[[str], bool] | None = None,
    n_threads: int = 1,
) -> nn.Module:
    """Train ``model`` in place on ``task``'s train split with AdamW and cross-entropy; returns it in eval mode.

    ``trainable(name)`` selects the parameters that train (default: all), e.g. ``lambda n: n.startswith("head")``
    for a linear probe. The learning rate follows a cosine from ``lr`` to 0 over all steps."""
    names = [n for n, _ in model.named_parameters()]
    sel = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if not sel:
        raise ValueError(f"no trainable parameters (parameters: {', '.join(names)})")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(n))
    x, y = task.x_train, task.y_train
    steps_per_epoch = (len(y) + batch_size - 1) // batch_size
    total = max(1, epochs * steps_per_epoch)
    with torch.random.fork_rng(devices=[]), threads(n_threads):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(sel, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(total))
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch_size):
                idx = perm[i:i + batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    return model.eval()


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """``model(x)`` in eval mode, without gradients, in batches of ``batch_size`` rows."""
    if isinstance(model, nn.Module):
        model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (fraction in [0, 1]); ties go to the lowest class index (``argmax``)."""
    return float((logits.argmax(-1) == y).float().mean())


def evaluate(model: Callable[[torch.Tensor], torch.Tensor], task: Task, split: str = "test") -> float:
    """Top-1 accuracy of ``model`` on ``task``'s ``split`` ("train" | "val" | "test"), a fraction in [0, 1]."""
    x, y = task.split(split)
    return accuracy(predict(model, x), y)


def state_hash(sd: Mapping[str, torch.Tensor]) -> str:
    """A 16-hex-digit hash of a state dict's names, shapes, dtypes and bytes (identifies an init)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu()
        h.update(f"{k}:{list(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def task_hash(task: Task) -> str:
    """A hash of the task's train split (images and labels): two tasks that train differently never share a key."""
    return state_hash({"x": task.x_train, "y": task.y_train})


def cache_key(config: ModelConfig, task: Task, *, seed: int, epochs: int, lr: float, init: str = "",
              batch_size: int = 64, weight_decay: float = 0.0, trainable: str = "all", model_seed: int | None = None) -> str:
    """The cache file stem for one training run (a readable prefix + a hash of every input)."""
    spec = {
        "recipe": RECIPE_VERSION, "model": config.key(), "task": task.name, "split_seed": task.seed,
        "data": task_hash(task), "seed": seed,
        "model_seed": seed if model_seed is None else model_seed, "epochs": epochs, "lr": lr, "init": init,
        "batch_size": batch_size, "weight_decay": weight_decay, "trainable": trainable,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    kind = json.loads(config.key())["kind"]
    return f"{kind}-{task.name}-s{seed}-e{epochs}-{digest}"


def save_state(path: Path, sd: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> None:
    """Write ``sd`` as safetensors at ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=dict(meta or {}))
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict (CPU)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def train_cached(
    config: ModelConfig,
    task: Task,
    *,
    epochs: int,
    lr: float,
    seed: int,
    cache_dir: str | Path | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
    model_seed: int | None = None,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    trainable: str = "all",
    n_threads: int = 1,
) -> nn.Module:
    """``build(config, model_seed)`` (default ``model_seed = seed``), load ``init`` over it (a possibly partial
    state dict: e.g. a pretrained body without its head), ``train`` it, and cache the result; a later call with
    the same inputs loads the checkpoint instead of training. ``trainable``: "all", "head" (a linear probe) or
    "body" (the head frozen, as task arithmetic fine-tunes under a fixed classifier).
    ``cache_dir=False``-like empty string disables the cache."""
    if trainable not in ("all", "head", "body"):
        raise ValueError(f"trainable must be 'all', 'head' or 'body', got {trainable!r}")
    ms = seed if model_seed is None else model_seed
    model = build(config, ms)
    if init is not None:
        own = model.state_dict()
        for k, v in init.items():
            if k not in own:
                raise KeyError(f"init has '{k}', the model has no such parameter")
            if own[k].shape != v.shape:  # e.g. a pretext head of another size: keep the fresh one
                continue
            own[k] = v
        model.load_state_dict(own)
    init_tag = state_hash(model.state_dict())
    key = cache_key(config, task, seed=seed, epochs=epochs, lr=lr, init=init_tag, batch_size=batch_size,
                    weight_decay=weight_decay, trainable=trainable, model_seed=ms)
    root = default_cache_dir() if cache_dir is None else Path(cache_dir) if cache_dir != "" else None
    path = None if root is None else root / f"{key}.safetensors"
    if path is not None and path.is_file():
        model.load_state_dict(load_state(path))
        return model.eval()
    train(model, task, epochs, lr, seed, batch_size=batch_size, weight_decay=weight_decay, n_threads=n_threads,
          trainable={"all": None, "head": lambda n: n.startswith("head."),
                     "body": lambda n: not n.startswith("head.")}[trainable])
    if path is not None:
        save_state(path, model.state_dict(), {"key": key, "config": config.key(), "task": task.name})
    return model
