"""Model soups: the uniform soup and the greedy soup, streaming over checkpoints on disk or in memory.

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", https://arxiv.org/abs/2203.05482 (Recipe 1 = greedy soup).

    uniform soup   θ = (1/N)·Σ_i θ_i                      (or Σ_i w_i·θ_i / Σ_i w_i with ``weights``)
    greedy soup    sort the N candidates by their own held-out score, descending; soup = {best};
                   for each next candidate i: θ_c = (Σ_{j∈soup} θ_j + θ_i) / (|soup| + 1);
                   keep i if score(θ_c) >= score(soup) (the score does not drop; ``strict=True``: >,
                   as the released model-soups code); one pass, each candidate tried once.

A checkpoint is an in-memory state dict or a path that fastmerge's reader opens (a ``.safetensors``
file, a model folder with ``model.safetensors`` or an index + shards, a ``pytorch_model.bin``). Paths are
read tensor by tensor (memory-mapped) and never held whole: the uniform soup keeps one fp32 running
sum; the greedy soup keeps the fp32 running sum of the accepted ingredients plus the candidate being
scored (two state dicts, as the reference implementation), re-reading an accepted checkpoint from disk
to add it to the sum. Sums are accumulated in fp32 whatever the checkpoints' dtype (bf16 has 8 bits of
mantissa: adding 10 bf16 models in bf16 would lose ~3 of them) and the result is cast to ``out_dtype``
(default: each tensor's dtype in the first checkpoint). Non-float tensors (e.g. BatchNorm's
``num_batches_tracked``) are copied from the first checkpoint.

The held-out score is yours: ``score(state_dict) -> float`` (higher is better), or ``model=`` and
``loader=`` (a module of the checkpoints' architecture and labelled ``(inputs, labels)`` batches: top-1
accuracy, as ``accuracy_score(model, loader)`` builds it).

    soup = uniform_soup(["run1/", "run2/", "run3.safetensors"])            # paths or state dicts
    g = greedy_soup(paths, model=net, loader=[(x_val, y_val)])             # g.state_dict, g.ingredients
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch

from .._lazy import torch_dtype
from ..errors import ConfigError

Checkpoint = Union[Mapping[str, torch.Tensor], str, os.PathLike]
StateDict = dict[str, torch.Tensor]
ScoreFn = Callable[[Mapping[str, torch.Tensor]], float]



class _Source:
    """Uniform access to one checkpoint: names, shapes, dtypes, and tensors one at a time."""

    def __init__(self, ck: Checkpoint, where: str):
        self.where = where
        self._sd: Mapping[str, torch.Tensor] | None = None
        self._reader: Any = None
        if isinstance(ck, Mapping):
            self._sd = ck
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in ck.items()}
        elif isinstance(ck, (str, os.PathLike)):
            from ..io.index import CheckpointIndex
            from ..io.reader import ModelReader

            index = CheckpointIndex.open(Path(ck))
            self._index = index
            self._reader = ModelReader(index, max_open=2, mapped=False)  # reads without dropping pages
            self.meta = {k: (t.shape, torch_dtype(t.dtype)) for k, t in index.tensors.items()}
            self.where = f"{where} ({Path(ck)})"
        else:
            raise ConfigError(f"{where}: a checkpoint is a state dict or a path, got {type(ck).__name__}")

    def get(self, key: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[key]
        return self._reader.get(self._index.tensors[key])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _open(ck: Checkpoint, i: int) -> _Source:
    return _Source(ck, f"checkpoints[{i}]")


def _check_same(ref: _Source, src: _Source) -> None:
    missing = [k for k in ref.meta if k not in src.meta]
    if missing:
        raise ConfigError(f"{src.where} lacks tensor '{missing[0]}' (present in {ref.where})")
    extra = [k for k in src.meta if k not in ref.meta]
    if extra:
        raise ConfigError(f"{src.where} has tensor '{extra[0]}' that {ref.where} lacks")
    for k, (shape, _) in ref.meta.items():
        if tuple(src.meta[k][0]) != tuple(shape):
            raise ConfigError(f"{src.where}: tensor '{k}' has shape {list(src.meta[k][0])}, {ref.where} {list(shape)}")


def _is_float(dt: torch.dtype) -> bool:
    return dt.is_floating_point


class _Accumulator:
    """An fp32 running (weighted) sum over checkpoints with the keys, shapes and dtypes of the first one."""

    def __init__(self, ref: _Source):
        self.ref = ref
        self.sum: StateDict = {}
        self.count = 0.0

    def add(self, src: _Source, w: float = 1.0) -> None:
        first = not self.sum
        for k, (_, dt) in self.ref.meta.items():
            t = src.get(k)
            if not _is_float(dt):
                if first:
                    self.sum[k] = t.clone()
                continue
            v = t.float() if w == 1.0 else t.float() * w
            if first:
                self.sum[k] = v.clone() if v.data_ptr() == t.data_ptr() else v
            else:
                self.sum[k].add_(v)
        self.count += w

    def average(self, out_dtype: torch.dtype | None, extra: _Source | None = None, w: float = 1.0) -> StateDict:
        """(sum + w·extra) / (count + w), or sum / count without ``extra``, in the output dtypes."""
        n = self.count + (w if extra is not None else 0.0)
        out: StateDict = {}
        for k, (_, dt) in self.ref.meta.items():
            s = self.sum[k]
            if not _is_float(dt):
                out[k] = s
                continue
            v = s if extra is None else s + extra.get(k).float() * w
            out[k] = (v / n).to(out_dtype or dt)
        return out


def _sources(checkpoints: Iterable[Checkpoint]) -> Iterator[_Source]:
    for i, ck in enumerate(checkpoints):
        yield _open(ck, i)


def uniform_soup(
    checkpoints: Iterable[Checkpoint],
    *,
    weights: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> StateDict:
    """The uniform soup (1/N)·Σ θ_i of ``checkpoints`` (state dicts or paths), read one at a time.

    ``weights``: Σ w_i·θ_i / Σ w_i instead (a weighted soup). ``checkpoints`` may be any iterable (a
    generator of paths or of state dicts loaded on demand): only one is open at a time."""
    acc: _Accumulator | None = None
    ref: _Source | None = None
    n = 0
    for i, src in enumerate(_sources(checkpoints)):
        try:
            if ref is None:
                ref = src
                acc = _Accumulator(src)
            else:
                _check_same(ref, src)
            if weights is not None and i >= len(weights):
                raise ConfigError(f"uniform_soup: {len(weights)} weights for more than {len(weights)} checkpoints")
            w = 1.0 if weights is None else float(weights[i])
            assert acc is not None
            acc.add(src, w)
            n += 1
        finally:
            if src is not ref:
                src.close()
    if acc is None or ref is None:
        raise ConfigError("uniform_soup: no checkpoints given")
    if weights is not None and len(weights) != n:
        raise ConfigError(f"uniform_soup: {len(weights)} weights for {n} checkpoints")
    if acc.count == 0:
        raise ConfigError("uniform_soup: the weights sum to 0")
    out = acc.average(out_dtype)
    ref.close()
    return out


@dataclasses.dataclass
class GreedySoup:
    """The result of ``greedy_soup``.

    ``state_dict``: the soup; ``ingredients``: indices (into the input list) of the models in it, in the
    order they were added; ``scores``: each candidate's own held-out score; ``order``: the candidates by
    descending score; ``history``: (candidate index, score of the soup with it, accepted) per step after
    the first; ``score``: the final soup's held-out score."""

    state_dict: StateDict
    ingredients: list[int]
    scores: list[float]
    order: list[int]
    history: list[tuple[int, float, bool]]
    score: float


def _load_full(src: _Source, out_dtype: torch.dtype | None) -> StateDict:
    return {k: (src.get(k).to(out_dtype) if out_dtype is not None and _is_float(dt) else src.get(k))
            for k, (_, dt) in src.meta.items()}


def greedy_soup(
    checkpoints: Sequence[Checkpoint],
    score: ScoreFn | None = None,
    *,
    model: torch.nn.Module | None = None,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    scores: Sequence[float] | None = None,
    strict: bool = False,
    out_dtype: torch.dtype | None = None,
) -> GreedySoup:
    """Greedy soup (Wortsman et al., Recipe 1) of ``checkpoints`` (state dicts or paths).

    The held-out score: ``score(state_dict) -> float`` (higher is better), or ``model`` + ``loader`` (a
    module of the checkpoints' architecture and labelled batches: top-1 accuracy, ``accuracy_score``).
    It receives each candidate soup in the output dtype. ``scores``: the candidates' own scores if already
    known (skips N evaluations). A candidate joins when the soup's score does not drop (``>=``), or when
    it rises (``strict=True``, the released model-soups code). Ties in the individual scores keep the
    input order (a stable sort)."""
    if score is None:
        if model is None or loader is None:
            raise ConfigError("greedy_soup: give score=, or model= and loader= (labelled held-out batches)")
        score = accuracy_score(model, loader)
    elif model is not None or loader is not None:
        raise ConfigError("greedy_soup: give score= or model= and loader=, not both")
    cks = list(checkpoints)
    if not cks:
        raise ConfigError("greedy_soup: no checkpoints given")
    if scores is not None and len(scores) != len(cks):
        raise ConfigError(f"greedy_soup: {len(scores)} scores for {len(cks)} checkpoints")
    ref = _open(cks[0], 0)
    try:
        own: list[float] = []
        for i, ck in enumerate(cks):
            src = ref if i == 0 else _open(ck, i)
            try:
                if i:
                    _check_same(ref, src)
                own.append(float(scores[i]) if scores is not None else float(score(_load_full(src, out_dtype))))
            finally:
                if src is not ref:
                    src.close()
        order = sorted(range(len(cks)), key=lambda i: -own[i])  # sorted() is stable: ties keep input order
        acc = _Accumulator(ref)
        first = ref if order[0] == 0 else _open(cks[order[0]], order[0])
        acc.add(first)
        if first is not ref:
            first.close()
        best = own[order[0]]
        ingredients = [order[0]]
        history: list[tuple[int, float, bool]] = []
        for i in order[1:]:
            src = ref if i == 0 else _open(cks[i], i)
            try:
                cand = acc.average(out_dtype, extra=src)
                s = float(score(cand))
                del cand
                ok = s > best if strict else s >= best
                history.append((i, s, ok))
                if ok:
                    acc.add(src)  # re-reads a checkpoint on disk: the candidate is not kept alongside the sum
                    best = s
                    ingredients.append(i)
            finally:
                if src is not ref:
                    src.close()
        return GreedySoup(acc.average(out_dtype), ingredients, own, order, history, best)
    finally:
        ref.close()


def accuracy_score(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
) -> ScoreFn:
    """A ``score`` for ``greedy_soup``: top-1 accuracy of ``model`` holding the given weights on the labelled
    batches of ``loader`` (re-iterated for every call: a list or a DataLoader, not a one-shot generator).
    The weights are applied with ``torch.func.functional_call``; ``model``'s own parameters are untouched."""
    from torch.func import functional_call

    batches = loader

    @torch.no_grad()
    def score(sd: Mapping[str, torch.Tensor]) -> float:
        was = model.training
        model.eval()
        try:
            params = {k: v.to(device) for k, v in sd.items()}
            correct = total = 0
            for x, y in batches:
                logits = functional_call(model, params, (x.to(device),))
                correct += int((logits.argmax(-1) == y.to(device)).sum())
                total += int(y.numel())
        finally:
            model.train(was)
        if total == 0:
            raise ConfigError("accuracy_score: the loader yielded no examples")
        return correct / total

    return score


__all__ = ["Checkpoint", "GreedySoup", "uniform_soup", "greedy_soup", "accuracy_score"]
