"""Ensembles as torch modules, to compare merging (averaging weights) with ensembling (averaging outputs).

Paper: Wang et al., "Rethinking Weight-Averaged Model-merging", https://arxiv.org/abs/2411.09263
(Sec. 4 and 6.2; the names below are the paper's column names).

    Ens Logits        f(x) = Σ_i w_i·f_i(x)                    (w_i = 1/N by default)
    Ens Features      f(x) = head_avg(Σ_i w_i·φ_i(x))           φ_i = model i's penultimate features,
                                                                head_avg = the heads' weights averaged
    Ens Features*     f(x) = head_k(Σ_i w_i·φ_i(x))             the head of one model (k = 0: "the 1st")
    Greedy Ens ...    the same over a greedily chosen subset (``greedy_ensemble``): candidates sorted by
                      their own held-out score, one added when the ensemble's score does not drop
                      (the greedy-soup rule applied to outputs instead of weights).

A model used in a feature ensemble must have ``features(x)`` (the penultimate representation) and a
``head`` (an ``nn.Linear``, or any module when an explicit head is given); ``fastmerge.research.lab.models``
follow that contract. The modules hold references to the members (no copies): N models cost N forward
passes, which is the inference price merging avoids.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if n == 0:
        raise ConfigError("an ensemble needs at least one model")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} models")
    return [float(w) for w in weights]


class LogitEnsemble(nn.Module):
    """``Σ_i w_i·model_i(x)`` (the mean of the logits by default): the paper's "Ens Logits"."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = _weights(len(self.members), weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for w, m in zip(self.weights, self.members):
            y = m(x) * w
            out = y if out is None else out + y
        return out


def merged_head(heads: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """A copy of ``heads[0]`` whose every parameter is Σ_i w_i·(that parameter of heads[i]) (mean by default)."""
    ws = _weights(len(heads), weights)
    out = copy.deepcopy(heads[0])
    with torch.no_grad():
        named = [dict(h.named_parameters()) for h in heads]
        for name, p in out.named_parameters():
            p.copy_(sum(w * nm[name].detach() for w, nm in zip(ws, named)))
    return out


HeadSpec = Union[str, int, nn.Module]


class FeatureEnsemble(nn.Module):
    """``head(Σ_i w_i·model_i.features(x))``: the paper's "Ens Features" (``head="merged"``: the members'
    heads averaged with the same weights) or "Ens Features*" (``head=k``: model k's own head; the paper
    uses the 1st model, k=0). ``head`` may also be any module (e.g. a task head in multi-task merging)."""

    def __init__(self, models: Sequence[nn.Module], head: HeadSpec = "merged", weights: Sequence[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = _weights(len(self.members), weights)
        for i, m in enumerate(self.members):
            if not callable(getattr(m, "features", None)):
                raise ConfigError(f"FeatureEnsemble: models[{i}] ({type(m).__name__}) has no features() method")
        if isinstance(head, nn.Module):
            self.head = head
        elif head == "merged":
            self.head = merged_head([m.head for m in self.members], self.weights)
        elif isinstance(head, int) and not isinstance(head, bool):
            if not -len(self.members) <= head < len(self.members):
                raise ConfigError(f"FeatureEnsemble: head={head} but there are {len(self.members)} models")
            self.head = self.members[head].head
        else:
            raise ConfigError(f"FeatureEnsemble: head must be 'merged', a model index or a module, got {head!r}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The weighted mean of the members' penultimate features."""
        out = None
        for w, m in zip(self.weights, self.members):
            f = m.features(x) * w
            out = f if out is None else out + f
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclasses.dataclass
class GreedyEnsemble:
    """The result of ``greedy_ensemble``: the module, the chosen member indices (in the order added), every
    candidate's own score, the order tried, (candidate, ensemble score with it, accepted) per step, and the
    final score."""

    module: nn.Module
    members: list[int]
    scores: list[float]
    order: list[int]
    history: list[tuple[int, float, bool]]
    score: float


def ensemble(models: Sequence[nn.Module], kind: str = "logits", head: HeadSpec = "merged") -> nn.Module:
    """``LogitEnsemble(models)`` (kind "logits") or ``FeatureEnsemble(models, head)`` (kind "features")."""
    if kind == "logits":
        return LogitEnsemble(models)
    if kind == "features":
        return FeatureEnsemble(models, head=head)
    raise ConfigError(f"ensemble kind must be 'logits' or 'features', got {kind!r}")


def greedy_ensemble(
    models: Sequence[nn.Module],
    score: Callable[[nn.Module], float],
    *,
    kind: str = "logits",
    head: HeadSpec = "merged",
    scores: Sequence[float] | None = None,
    strict: bool = False,
) -> GreedyEnsemble:
    """Greedy ensemble ("Greedy Ens Logits" / "Greedy Ens Features"): sort ``models`` by ``score(model)``
    (or the given ``scores``), descending; start from the best; add each next model if the score of the
    ensemble with it does not drop (``strict``: rises). ``head`` as ``FeatureEnsemble`` (an index refers to
    the chosen subset: 0 is the best model)."""
    ms = list(models)
    if not ms:
        raise ConfigError("greedy_ensemble: no models given")
    own = [float(s) for s in scores] if scores is not None else [float(score(m)) for m in ms]
    if len(own) != len(ms):
        raise ConfigError(f"greedy_ensemble: {len(own)} scores for {len(ms)} models")
    order = sorted(range(len(ms)), key=lambda i: -own[i])
    chosen = [order[0]]
    best = own[order[0]]
    history: list[tuple[int, float, bool]] = []
    for i in order[1:]:
        s = float(score(ensemble([ms[j] for j in chosen + [i]], kind, head)))
        ok = s > best if strict else s >= best
        history.append((i, s, ok))
        if ok:
            chosen.append(i)
            best = s
    return GreedyEnsemble(ensemble([ms[j] for j in chosen], kind, head), chosen, own, order, history, best)


__all__ = ["LogitEnsemble", "FeatureEnsemble", "GreedyEnsemble", "merged_head", "ensemble", "greedy_ensemble"]
