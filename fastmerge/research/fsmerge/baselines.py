"""The baselines FS-Merge is compared with (spec §3), on the same API: ``models`` (state dicts in the
architecture's layout, model k trained on task k), ``data[k]`` (unlabeled inputs of task k) -> ``Folded``.

* ``average``: uniform weight average (Wortsman et al. 2022) -- fastmerge's own ``linear`` merge.
* ``regmean``: per linear layer ``W = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹`` with ``G_k = X_kᵀX_k`` the Gram matrix
  of model k's inputs to that layer and ``G̃ = αG + (1−α)diag(G)`` (Jin et al. 2023); every other
  parameter (biases, LayerNorms, embeddings) averaged.
* ``zipit``: ZipIt's matching folded without training (FS-Merge with hard-coded M, U; MLPs, pairs).
* ``distill``: knowledge distillation of the pre-head features into one student of the same
  architecture (init "first" or "average"), task-routed like FS-Merge, all parameters trained
  (``lora_rank=None``) or only rank-r LoRA adapters on every linear layer (then folded into the weights).
  The student gets per-task ``d_out × d_out`` output adapters (identity init), the same head-side capacity
  as FS-Merge's ``U_final``, so the comparison isolates the backbone.
* ``feature_ensemble``: not a merge (it runs every model): ``(1/n) Σ_j f^j(x)/mean|f^j|`` (the official
  code's ensemble), returned rescaled to each task's own feature scale.
"""

from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import torch
from torch import nn

from .arch import Inputs, Spec, canonical_fp32, cat_inputs, features, n_inputs, take
from .fold import Folded, to_original_layout
from .train import TrainConfig, fit, make_targets

Tensor = torch.Tensor


def _identity_unmerge(spec: Spec, canon: Mapping[str, Tensor], n: int) -> list[Tensor]:
    d = spec.feature_dim(canon)
    return [torch.eye(d) for _ in range(n)]


def _folded(spec: Spec, canon: dict[str, Tensor], models: Sequence[Mapping[str, Tensor]], unmerge: list[Tensor]) -> Folded:
    sd, dropped = to_original_layout(spec, canon, models)
    return Folded(sd, unmerge, {k: v.float() for k, v in canon.items()}, dropped)


def average(spec: Spec, models: Sequence[Mapping[str, Tensor]]) -> Folded:
    """Uniform weight average of the backbones (fastmerge ``linear`` merge, fp32 accumulation)."""
    from ... import merge_state_dicts

    keys = spec.known_keys(models[0])
    merged = merge_state_dicts("linear", [{k: m[k] for k in keys} for m in models], weight=[1.0] * len(models))
    canon = canonical_fp32(spec, merged)
    return _folded(spec, canon, models, _identity_unmerge(spec, canon, len(models)))


def grams(spec: Spec, canon: Mapping[str, Tensor], x: Inputs, batch_size: int = 512) -> dict[str, Tensor]:
    """Float64 Gram matrices ``XᵀX`` of the inputs of every linear layer of one model on ``x``."""
    out: dict[str, Tensor] = {}

    def record(name: str, inp: Tensor) -> None:
        v = inp.detach().reshape(-1, inp.shape[-1]).double()
        out[name] = out.get(name, 0) + v.T @ v

    with torch.no_grad():
        for i in range(0, n_inputs(x), batch_size):
            spec.forward(canon, take(x, slice(i, i + batch_size)), record=record)
    return out


def regmean(spec: Spec, models: Sequence[Mapping[str, Tensor]], data: Sequence[Inputs], *, alpha: float = 0.9,
            routed: bool = True) -> Folded:
    """RegMean with off-diagonal shrinkage ``alpha`` (the paper's 0.9 for pairs); model k's Grams from its
    own task data (``routed``) or from all data."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean: alpha must be in [0, 1], got {alpha}")
    canons = [canonical_fp32(spec, m) for m in models]
    all_x = None if routed else cat_inputs(list(data))
    gs = [grams(spec, c, data[k] if routed else all_x) for k, c in enumerate(canons)]
    out = {k: torch.stack([c[k] for c in canons]).mean(0) for k in canons[0]}
    for name in gs[0]:
        num = 0
        den = 0
        for c, g in zip(canons, gs):
            g = alpha * g[name] + (1 - alpha) * torch.diag(torch.diag(g[name]))
            num = num + c[f"{name}.w"].double() @ g
            den = den + g
        # dead ReLU units leave zero rows/columns: a ridge of 1e-8 of the mean diagonal keeps the solve
        # defined without moving well-conditioned layers (relative change ~1e-8)
        ridge = 1e-8 * float(torch.diagonal(den).mean()) + 1e-30
        den = den + ridge * torch.eye(den.shape[0], dtype=den.dtype)
        out[f"{name}.w"] = torch.linalg.solve(den, num.T).T.float()  # W = num · den⁻¹ (den symmetric)
    return _folded(spec, out, models, _identity_unmerge(spec, out, len(models)))


def zipit(spec: Spec, models: Sequence[Mapping[str, Tensor]], data: Sequence[Inputs]) -> Folded:
    """ZipIt (Stoica et al. 2024) on an MLP pair: the FS SuperNet with ZipIt's M (½ per matched pair) and
    ``U = 2Mᵀ``, folded without training (spec §2.1)."""
    from .fold import fold
    from .supernet import build_supernet

    sn = build_supernet(spec, models, rank="full", init="zipit", data=cat_inputs(list(data)))
    return fold(sn, models)


class Student(nn.Module):
    """A distillation student: canonical parameters of the architecture (all learnable, or frozen with
    LoRA factors), plus per-task output adapters ``[n_out, d_out, d_out]`` (identity init)."""

    def __init__(self, spec: Spec, init: Mapping[str, Tensor], n_out: int, lora_rank: int | None = None, seed: int = 0):
        super().__init__()
        self.spec = spec
        self.keys = sorted(init)
        self.lora_rank = lora_rank
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(init[k].detach().clone().float(),
                                                                          requires_grad=lora_rank is None)
                                        for k in self.keys})
        self.lora = nn.ParameterDict()
        if lora_rank is not None:
            gen = torch.Generator().manual_seed(seed)
            for name in spec.linear_names():
                if f"{name}.w" not in init:
                    continue
                out_d, in_d = init[f"{name}.w"].shape
                # LoRA's init: A ~ Kaiming-uniform-like scale 1/√in, B = 0 (the student starts at ``init``)
                a = (torch.rand(lora_rank, in_d, generator=gen) * 2 - 1) / math.sqrt(in_d)
                key = name.replace(".", "__")
                self.lora[f"{key}__a"] = nn.Parameter(a)
                self.lora[f"{key}__b"] = nn.Parameter(torch.zeros(out_d, lora_rank))
        d = spec.feature_dim(init)
        self.adapters = nn.Parameter(torch.eye(d).repeat(n_out, 1, 1))

    def canon(self) -> dict[str, Tensor]:
        """The student's canonical parameters (live, differentiable)."""
        return {k: self.params[k.replace(".", "__")] for k in self.keys}

    def lora_dict(self) -> dict[str, Tensor] | None:
        """``{name.a, name.b}`` LoRA factors, or None for full distillation."""
        if self.lora_rank is None:
            return None
        return {k.replace("__", "."): v for k, v in self.lora.items()}

    def forward(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """(features ``[B, d]``, per-task adapted features ``[B, n_out, d]``), like a SuperNet."""
        g = self.spec.forward(self.canon(), x, lora=self.lora_dict())
        return g, torch.einsum("bd,kde->bke", g, self.adapters)

    def merged_canon(self) -> dict[str, Tensor]:
        """Parameters with the LoRA terms folded in (``W + B·A``)."""
        out = {k: v.detach().clone() for k, v in self.canon().items()}
        lo = self.lora_dict()
        if lo is not None:
            for name in self.spec.linear_names():
                if f"{name}.a" in lo:
                    out[f"{name}.w"] = out[f"{name}.w"] + (lo[f"{name}.b"] @ lo[f"{name}.a"]).detach()
        return out


def distill(spec: Spec, models: Sequence[Mapping[str, Tensor]], data: Sequence[Inputs], *, init: str = "first",
            lora_rank: int | None = None, routed: bool = True, normalize_targets: bool = False,
            train: TrainConfig = TrainConfig(epochs=100), seed: int = 0) -> tuple[Folded, list[tuple[int, float]], float]:
    """Knowledge distillation of the models' pre-head features into one student (spec §3); returns
    (folded student, loss history, seconds)."""
    t0 = time.perf_counter()
    canons = [canonical_fp32(spec, m) for m in models]
    if init == "first":
        start = canons[0]
    elif init == "average":
        start = {k: torch.stack([c[k] for c in canons]).mean(0) for k in canons[0]}
    else:
        raise ValueError(f"distill: init must be 'first' or 'average', got {init!r}")
    targets = make_targets(spec, canons, data, routed=routed, normalize=normalize_targets)
    student = Student(spec, start, len(models), lora_rank, seed)
    with torch.no_grad():  # adapters start at s_k·I: the student's init reconstructs the scaled targets
        student.adapters.mul_(targets.scale[:, None, None])

    def loss_of(idx: Tensor) -> Tensor:
        return targets.loss(student(take(targets.inputs, idx))[1], idx)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        hist = fit(list(student.parameters()), loss_of, n_inputs(targets.inputs), train)
    canon = student.merged_canon()
    unmerge = [student.adapters[k].detach() / float(targets.scale[k]) for k in range(len(models))]
    return _folded(spec, canon, models, unmerge), hist, time.perf_counter() - t0


def feature_ensemble(spec: Spec, models: Sequence[Mapping[str, Tensor]], x: Inputs, scales: Sequence[float] | None = None) -> list[Tensor]:
    """The official code's output ensemble (not a merge): ``f̄ = (1/n) Σ_j f^j(x)/mean|f^j(x)|``, returned
    once per task k rescaled by ``mean|f^k|`` (so that task k's linear head sees its own feature scale).
    ``scales``: the per-model ``mean|f^j|`` (default: measured on ``x``)."""
    canons = [canonical_fp32(spec, m) for m in models]
    fs = [features(spec, c, x) for c in canons]
    sc = [float(f.abs().mean()) for f in fs] if scales is None else list(scales)
    avg = sum(f / s for f, s in zip(fs, sc)) / len(fs)
    return [avg * s for s in sc]
