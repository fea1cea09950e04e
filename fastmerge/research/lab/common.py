"""Shared pieces of the lab experiments: scoring closures, soups/ensembles of zoo models, timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from ..ensemble import FeatureEnsemble, LogitEnsemble, greedy_ensemble
from ..soups import accuracy_score, greedy_soup, uniform_soup
from .data import Task
from .train import evaluate, threads
from .zoo import Zoo

#: Every experiment evaluates on one thread: results must not depend on the machine's core count.
EVAL_THREADS = 1


def model_score(task: Task, split: str = "val") -> Callable[[nn.Module], float]:
    """``score(module) -> accuracy`` on ``task``'s ``split`` (the greedy ensembles' held-out score)."""
    return lambda m: evaluate(m, task, split)


def sd_score(template: nn.Module, task: Task, split: str = "val") -> Callable[[Mapping[str, torch.Tensor]], float]:
    """``score(state_dict) -> accuracy`` of ``template`` holding the weights (the greedy soups' held-out score)."""
    x, y = task.split(split)
    return accuracy_score(template, [(x, y)])


class Memo(nn.Module):
    """Wraps a model for evaluation: ``forward`` and ``features`` remember their output per input tensor
    (the val and test splits), so ensembles of N members cost N forward passes however many subsets the
    greedy ensembles try. ``head`` is the wrapped model's head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model
        self.head = model.head
        self._out: dict[tuple, torch.Tensor] = {}
        self._feat: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.stride())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        k = self._key(x)
        if k not in self._feat:
            self._feat[k] = self.inner.features(x)
        return self._feat[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._key(x)
        if k not in self._out:
            self._out[k] = self.inner(x)
        return self._out[k]


def soup_and_ensemble_row(zoo: Zoo, models: Sequence[nn.Module], task: Task) -> dict[str, float]:
    """Test accuracy of the paper's Table 1 columns for ``models`` (greedy choices on ``task``'s val split)."""
    sds = [m.state_dict() for m in models]
    # predict() evaluates in one batch (<= 2048 rows): the memo sees the split tensors themselves
    models = [Memo(m) for m in models]
    template = zoo.model(sds[0])
    score_sd = sd_score(template, task)
    score_m = model_score(task)
    val = [score_m(m) for m in models]
    out: dict[str, float] = {}
    out["Perf Ave"] = sum(evaluate(m, task) for m in models) / len(models)
    out["Uni Soups"] = evaluate(zoo.model(uniform_soup(sds)), task)
    g = greedy_soup(sds, score_sd, scores=val)
    out["Grd Soups"] = evaluate(zoo.model(g.state_dict), task)
    out["Ens Logits"] = evaluate(LogitEnsemble(models), task)
    out["Ens Features"] = evaluate(FeatureEnsemble(models, head="merged"), task)
    out["Ens Features*"] = evaluate(FeatureEnsemble(models, head=0), task)
    out["Grd Ens Logits"] = evaluate(greedy_ensemble(models, score_m, kind="logits", scores=val).module, task)
    out["Grd Ens Features"] = evaluate(greedy_ensemble(models, score_m, kind="features", scores=val).module, task)
    out["_greedy_soup_size"] = float(len(g.ingredients))
    return out


COLUMNS = ["Perf Ave", "Uni Soups", "Grd Soups", "Ens Logits", "Ens Features", "Ens Features*", "Grd Ens Logits",
           "Grd Ens Features"]


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def out_dir_for(out_dir: Path, name: str) -> Path:
    """``out_dir/name`` (created)."""
    d = Path(out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def command(name: str, smoke: bool) -> str:
    """The command line that reproduces an experiment."""
    return f"fastmerge lab {name}" + (" --smoke" if smoke else "")


def single_thread() -> ContextManager[None]:
    """The evaluation thread context (see ``EVAL_THREADS``)."""
    return threads(EVAL_THREADS)
