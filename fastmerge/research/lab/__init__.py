"""The merge-quality lab: small models trained on real data (sklearn's 8x8 digits) to reproduce papers' findings.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn. Every run is seeded
and reproducible; trained checkpoints are cached (safetensors) under ``--cache`` (default
``$FASTMERGE_LAB_CACHE`` or ``~/.cache/fastmerge/lab``). Command line: ``fastmerge lab list``,
``fastmerge lab <experiment> [--smoke] [--out docs/lab] [--cache DIR]``.

Stable API (other lab modules build on it):

``fastmerge.research.lab.data``
    ``TASK_NAMES`` (8 tasks: identity, rot90, rot180, rot270, hflip, invert, block_shuffle, label_perm);
    ``make_tasks(seed=0, names=TASK_NAMES) -> dict[str, Task]``; ``make_task(name, seed)``;
    ``Task(name, x_train, y_train, x_val, y_val, x_test, y_test, n_classes, seed)`` with images
    ``[N, 1, 8, 8]`` float32 (standardised) and labels ``[N]`` int64, ``task.split("val") -> (x, y)``;
    ``flat(x) -> [N, 64]``, ``images(x) -> [N, 1, 8, 8]``.
``fastmerge.research.lab.models``
    ``MLP(d_in, hidden, n_classes)`` (layers ``fc1..fcK``, ``head``) and ``TinyViT(image, patch, dim, depth,
    heads, mlp_ratio, n_classes)`` (timm names), both with ``features(x)`` (penultimate) and ``head``
    (``model(x) == model.head(model.features(x))``); ``MLPConfig`` / ``ViTConfig`` (frozen, ``.key()``);
    ``build(config, seed) -> nn.Module`` (initial weights a function of ``seed`` only).
``fastmerge.research.lab.train``
    ``train(model, task, epochs, lr, seed, *, batch_size=64, weight_decay=0, trainable=None, n_threads=1)``
    (deterministic: bit-identical weights for the same call); ``evaluate(model, task, split="test") ->
    accuracy`` in [0, 1]; ``predict(model, x)``; ``accuracy(logits, y)``; ``train_cached(config, task, *,
    epochs, lr, seed, cache_dir=None, init=None, model_seed=None, trainable="all"|"head"|"body")`` (checkpoint
    cache keyed by config, task, split seed, init hash, seed, epochs, lr...); ``default_cache_dir()``;
    ``save_state`` / ``load_state`` (safetensors).
``fastmerge.research.lab.zoo``
    ``Zoo(kind="mlp"|"vit", cache_dir=None, smoke=False)``: ``.tasks``, ``.pretrained()``,
    ``.pretrained_body()`` (θ_0), ``.probe(task)``, ``.finetuned(task, seed=0)`` (LP-FT from θ_0),
    ``.finetuned_body(task, seed)`` (head frozen), ``.finetuned_hp(task, seed)`` (random hyperparameters),
    ``.scratch(task, seed)``, ``.multitask()`` (a ``MultiHead``; ``.for_task(t)``), ``.model(state_dict)``;
    ``body(sd)`` / ``head(sd)`` split a state dict at ``head.*``.
``fastmerge.research.lab.report``
    ``write_table(path, title, header, rows, notes)`` (markdown) and ``fmt_pct``.

``EXPERIMENTS``: name -> callable ``(out_dir: Path, cache_dir: Path | None, smoke: bool) -> Path`` of the
written markdown table (plots beside it, under ``out_dir/<name>/``). Entries are lazy (``_lazy("module:function")``),
so importing ``fastmerge.research.lab`` imports neither torch-heavy experiment code nor matplotlib; add one with a
one-line insertion, e.g. ``"fsmerge_mlp": _lazy("fastmerge.research.fsmerge.study:run_mlp"),``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Optional

Experiment = Callable[[Path, Optional[Path], bool], Path]


def _lazy(target: str, doc: str = "") -> Experiment:
    """A callable that imports ``module:function`` on first call (keeps ``import fastmerge.research.lab`` light)."""
    mod, fn = target.split(":")

    def run(out_dir: Path, cache_dir: Optional[Path], smoke: bool) -> Path:
        return getattr(importlib.import_module(mod), fn)(Path(out_dir), None if cache_dir is None else Path(cache_dir), smoke)

    run.__doc__ = doc or target
    run.target = target  # type: ignore[attr-defined]
    return run


EXPERIMENTS: dict[str, Experiment] = {
    "soups": _lazy("fastmerge.research.lab.exp_soups:run", "1. soups vs ensembles for 2/3/5/10 models (paper Table 1 / Fig. 3)"),
    "magnification": _lazy("fastmerge.research.lab.exp_magnification:run", "2. accuracy vs weight magnification c (Fig. 8b)"),
    "templates": _lazy("fastmerge.research.lab.exp_templates:run", "3. linear-classifier templates and their merge (Fig. 1-2)"),
    "multitask": _lazy("fastmerge.research.lab.exp_multitask:run", "4. eight-task merging table: TA, TIES, DARE, CART, M-TIES..."),
    "mloss": _lazy("fastmerge.research.lab.exp_mloss:run", "5. M-Loss vs the merged-ensembled accuracy gap (rank correlation)"),
    "fsmerge_mlp": _lazy("fastmerge.research.fsmerge.study:run_mlp", "FS-Merge on MLPs of 1-4 layers, digits halves (paper Table 2)"),
    "fsmerge_vit": _lazy("fastmerge.research.fsmerge.study:run_vit", "FS-Merge of two tiny ViTs from different inits vs KD, ensemble"),
}


def run(name: str, out_dir: str | Path = "docs/lab", cache_dir: str | Path | None = None, smoke: bool = False) -> Path:
    """Run experiment ``name``; returns the path of its markdown table (under ``out_dir/<name>/``)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r} (experiments: {', '.join(EXPERIMENTS)})")
    return EXPERIMENTS[name](Path(out_dir), None if cache_dir is None else Path(cache_dir), smoke)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every experiment."""
    return [(k, (v.__doc__ or "").strip().splitlines()[0] if v.__doc__ else "") for k, v in EXPERIMENTS.items()]


__all__ = ["EXPERIMENTS", "Experiment", "run", "describe"]
