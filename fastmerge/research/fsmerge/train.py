"""Training a SuperNet: feature reconstruction on unlabeled data, local or global, task-routed, sequential.

Objectives (spec §2.7; no labels anywhere, the models only produce targets, computed once):

* **global, routed** (transformers, App. B.2): ``L = Σ_k E_{x∼D^k} ‖f^k(x) − (U_final g*(x))[k]‖²`` --
  an input of task k is compared only with model k's pre-head features;
* **global, all** (MLPs, Eq. 4): ``L = E_{x∼D} ‖(f^1‖…‖fⁿ)(x) − U_final g*(x)‖²``;
* **local** (MLPs, Eq. 2-3): per layer l, independently,
  ``E_{x∼D} ‖(f_l^1‖…‖f_l^n) − U_l σ(M_l (z_l^1‖…‖z_l^n))‖²`` on the models' own pre-activations. The
  per-layer problems share no parameter, so one optimiser on the sum of their losses solves them all at
  once (AdamW and SGD update each parameter from its own gradient only);
* **sequential** (App. B.4): merge one new model at a time into the running merge, two sets of weights
  in memory; every stage reconstructs all tasks seen so far, ``U_final``'s old task blocks carried over.

The loss is the mean squared error (the official code's ``rec_with_ids``: a mean over batch and
dimensions, which only rescales the paper's sum). With ``normalize_targets`` model k's targets are
multiplied by ``s_k = 1/mean|f^k|`` (so both models weigh the same, spec §2.7) and block k of
``U_final`` is divided by ``s_k`` after training: predictions are unchanged by the rescaling.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import torch

from .arch import Inputs, Spec, canonical_fp32, cat_inputs, features, n_inputs, take
from .fold import Folded, fold
from .supernet import Factor, MLPSuperNet, Rank, SuperNet, build_supernet

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation of a SuperNet (or a distillation student).

    Defaults are the paper's ViT recipe (App. E.2): AdamW, batch 128, one-cycle schedule with linear
    annealing (the official ``main.py``), lr 1e-4 for low rank. The MLP recipe (App. E.1) is full-batch
    SGD with momentum: ``batch_size=None, optimizer="sgd"``."""

    epochs: int = 200
    steps: int | None = None  # overrides epochs
    batch_size: int | None = 128  # None: full batch
    lr: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"  # onecycle | cosine | step | constant
    warmup: float = 0.1  # fraction of the steps (cosine)
    seed: int = 0
    log_every: int = 0  # record the loss every k steps (0: first and last only)
    # torch intra-op threads while training (0: leave as is). Small SuperNets are op-overhead bound: on
    # a loaded 2-core box one thread ran a 12-wide ViT step in 11 ms, two threads in 528 ms (measured)
    threads: int = 0

    def total_steps(self, n: int) -> int:
        """Optimizer steps for ``n`` samples (``steps``, else epochs × batches per epoch)."""
        if self.steps is not None:
            return self.steps
        per_epoch = 1 if self.batch_size is None else math.ceil(n / self.batch_size)
        return max(1, self.epochs * per_epoch)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, anneal_strategy="linear")
    if cfg.schedule == "cosine":
        warm = int(cfg.warmup * total)

        def f(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

        return torch.optim.lr_scheduler.LambdaLR(opt, f)
    if cfg.schedule == "step":
        # the paper's MLP "step lr": two drops by γ = 0.9 (App. E.1), at 1/3 and 2/3 of the run
        return torch.optim.lr_scheduler.MultiStepLR(opt, [total // 3, 2 * total // 3], gamma=0.9)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r} (onecycle | cosine | step | constant)")


def fit(params: Sequence[torch.nn.Parameter], loss_of: Callable[[Tensor], Tensor], n: int, cfg: TrainConfig) -> list[tuple[int, float]]:
    """Minimise ``loss_of(idx)`` (a mini-batch of sample indices) over ``params``; returns (step, loss) pairs."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw | sgd)")
    old_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _fit(params, opt, loss_of, n, cfg)
    finally:
        torch.set_num_threads(old_threads)


def _fit(params, opt, loss_of, n: int, cfg: TrainConfig) -> list[tuple[int, float]]:
    total = cfg.total_steps(n)
    sched = _scheduler(opt, cfg, total)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = n if cfg.batch_size is None else min(cfg.batch_size, n)
    history: list[tuple[int, float]] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(total):
        if bs == n:
            idx = torch.arange(n)
        else:
            if pos + bs > n:  # a partial last batch is dropped: every step sees bs samples
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + bs]
            pos += bs
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 0 or step == total - 1 or (cfg.log_every and step % cfg.log_every == 0):
            history.append((step, float(loss.detach())))
    return history


# ----------------------------------------------------------------------------------------------------
# targets


@dataclasses.dataclass
class Targets:
    """Merge data and cached targets: ``inputs`` (all tasks concatenated), ``task`` ids ``[N]``, and
    ``y``: ``[N, d]`` (routed: model task[i]'s features of x_i) or ``[N, n, d]`` (every model on every x)."""

    inputs: Inputs
    task: Tensor
    y: Tensor
    routed: bool
    scale: Tensor  # [n] per-model target scale s_k (ones without normalisation)

    def loss(self, recon: Tensor, idx: Tensor) -> Tensor:
        """MSE of a reconstruction ``[B, n_out, d]`` against the targets of rows ``idx``."""
        if self.routed:
            pred = recon[torch.arange(len(idx)), self.task[idx]]
            return torch.mean((pred - self.y[idx]) ** 2)
        return torch.mean((recon - self.y[idx]) ** 2)


def make_targets(spec: Spec, canons: Sequence[Mapping[str, Tensor]], data: Sequence[Inputs], *, routed: bool,
                 normalize: bool = False, tasks: Sequence[int] | None = None) -> Targets:
    """Targets of ``canons`` (model k ↔ task k) on ``data[k]`` (inputs of task k); ``tasks`` restricts to
    a subset (the sequential variant's stages)."""
    tasks = list(range(len(data))) if tasks is None else list(tasks)
    inputs = cat_inputs([data[k] for k in tasks])
    task = torch.cat([torch.full((n_inputs(data[k]),), j, dtype=torch.long) for j, k in enumerate(tasks)])
    if routed:
        feats = [features(spec, canons[k], data[k]) for k in tasks]
        scale = torch.tensor([1.0 / float(f.abs().mean()) if normalize else 1.0 for f in feats])
        y = torch.cat([f * s for f, s in zip(feats, scale)])
    else:
        allf = [features(spec, canons[k], inputs) for k in tasks]
        scale = torch.tensor([1.0 / float(f.abs().mean()) if normalize else 1.0 for f in allf])
        y = torch.stack([f * s for f, s in zip(allf, scale)], dim=1)
    return Targets(inputs, task, y, routed, scale)


def scale_unmerge_block(f: Factor, k: int, s: float) -> None:
    """Multiply block k of an unmerge factor by ``s`` (diagonal, and the low-rank ``b``'s block k)."""
    with torch.no_grad():
        if f.rank == "full":
            f.full[k] *= s
        else:
            f.diag[k] *= s
            if f.rank:
                f.b[:, k] *= s


# ----------------------------------------------------------------------------------------------------
# objectives


def train_global(sn: SuperNet, targets: Targets, cfg: TrainConfig) -> list[tuple[int, float]]:
    """Global FS-Merge: end-to-end reconstruction of the targets through the whole SuperNet."""
    def loss_of(idx: Tensor) -> Tensor:
        return targets.loss(sn(take(targets.inputs, idx))[1], idx)

    scales = targets.scale.tolist()
    for k, s in enumerate(scales):  # the init reconstructs the *scaled* targets (first init stays exact)
        scale_unmerge_block(sn.f("u_final"), k, s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        hist = fit(sn.learnable(), loss_of, n_inputs(targets.inputs), cfg)
    for k, s in enumerate(scales):
        scale_unmerge_block(sn.f("u_final"), k, 1.0 / s)
    return hist


def train_local(sn: MLPSuperNet, canons: Sequence[Mapping[str, Tensor]], x: Tensor, cfg: TrainConfig) -> list[tuple[int, float]]:
    """Local FS-Merge of an MLP (Eq. 2-3): every layer reconstructs both models' activations from their
    own pre-activations, on all of ``x``."""
    if not isinstance(sn, MLPSuperNet):
        raise ValueError("local FS-Merge is defined for MLPs (it fails for transformers, App. G.3)")
    if sn.n_out != sn.n:
        raise ValueError("local FS-Merge reconstructs every model's features (n_out must equal n)")
    traces = []
    with torch.no_grad():
        for c in canons:
            tr: list[tuple[Tensor, Tensor]] = []
            sn.spec.forward(c, x, trace=tr)
            traces.append(tr)
    depth = sn.spec.depth
    z = [torch.stack([t[i][0] for t in traces], dim=1) for i in range(depth)]
    f = [torch.stack([t[i][1] for t in traces], dim=1) for i in range(depth)]
    if sn.spec.act == "relu":
        # ReLU is positively homogeneous: U σ(M z/c) = f/c has exactly the solutions of U σ(M z) = f, so
        # dividing layer l's problem by c_l = mean|f_l| changes no optimum, only the conditioning. Without
        # it the lab's 3-4 layer MLPs start at losses of 23-32 and lr 0.1 killed the merged ReLUs of one
        # seed in three (per-task 47 % and 20 % instead of ~96 %).
        for i in range(depth):
            c = f[i].abs().mean().clamp_min(1e-12)
            z[i], f[i] = z[i] / c, f[i] / c
    facs = [(sn.f(f"m{i}"), sn.f(sn.u_key(i))) for i in range(depth)]
    if len(set(sn.widths)) == 1 and all(m.rank == "full" for m, _ in facs):
        return _train_local_stacked(sn, facs, z, f, cfg)

    def loss_of(idx: Tensor) -> Tensor:
        return sum(torch.mean((sn.local_forward(i, z[i][idx]) - f[i][idx]) ** 2) for i in range(depth))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return fit(sn.learnable(), loss_of, len(x), cfg)


def _train_local_stacked(sn: MLPSuperNet, facs: list[tuple[Factor, Factor]], z: list[Tensor], f: list[Tensor],
                         cfg: TrainConfig) -> list[tuple[int, float]]:
    """Equal-width dense layers: the L independent local problems as one batched problem (one bmm per
    factor instead of L matmuls). Per-step time on the 2-core box is dominated by op overhead, so a
    4-layer MLP trains ~3× faster; the maths (and each parameter's gradient) is the same as per layer."""
    n, d = sn.n, sn.widths[0]
    act = sn.spec.act
    from .arch import act_fn

    sigma = act_fn(act)
    m = torch.nn.Parameter(torch.stack([mf.full.detach().reshape(n * d, d) for mf, _ in facs]))
    u = torch.nn.Parameter(torch.stack([uf.full.detach().permute(1, 0, 2).reshape(d, n * d) for _, uf in facs]))
    zs = torch.stack([t.flatten(-2) for t in z])  # [L, N, n·d]
    fs = torch.stack([t.flatten(-2) for t in f])

    def loss_of(idx: Tensor) -> Tensor:
        pred = torch.bmm(sigma(torch.bmm(zs[:, idx], m)), u)
        return ((pred - fs[:, idx]) ** 2).mean(dim=(1, 2)).sum()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        hist = fit([m, u], loss_of, zs.shape[1], cfg)
    with torch.no_grad():
        for i, (mf, uf) in enumerate(facs):
            mf.full.copy_(m[i].reshape(n, d, d))
            uf.full.copy_(u[i].reshape(d, n, d).permute(1, 0, 2))
    return hist


# ----------------------------------------------------------------------------------------------------
# the API


@dataclasses.dataclass
class FSMergeResult:
    """``folded``: the merged model (original layout) and per-task unmerges; ``supernet``: the trained
    SuperNet (None for the sequential variant's intermediate stages); ``history``: (step, loss) pairs."""

    folded: Folded
    supernet: SuperNet | None
    history: list[tuple[int, float]]
    seconds: float


def fs_merge(
    spec: Spec,
    models: Sequence[Mapping[str, Tensor]],
    data: Sequence[Inputs],
    *,
    rank: Rank = 12,
    hidden_rank: Rank | None = None,
    init: str = "first",
    anchor: int = 0,
    mode: str = "global",
    routed: bool = True,
    normalize_targets: bool = False,
    train: TrainConfig = TrainConfig(),
    seed: int = 0,
) -> FSMergeResult:
    """Merge ``models`` (state dicts in ``spec``'s layout; model k was trained on task k) with FS-Merge,
    from unlabeled ``data`` (``data[k]``: inputs of task k). ``mode``: ``global`` (any architecture) or
    ``local`` (MLPs: every layer independently, all data, no routing). Returns the folded model."""
    if len(models) != len(data):
        raise ValueError(f"fs_merge: {len(models)} models but {len(data)} data sets (one per model/task)")
    if mode not in ("global", "local"):
        raise ValueError(f"mode must be 'global' or 'local', got {mode!r}")
    t0 = time.perf_counter()
    canons = [canonical_fp32(spec, m) for m in models]
    all_x = cat_inputs(list(data))
    sn = build_supernet(spec, models, rank=rank, hidden_rank=hidden_rank, init=init, anchor=anchor, seed=seed,
                        data=all_x if init == "zipit" else None)
    if mode == "local":
        hist = train_local(sn, canons, all_x, train)  # type: ignore[arg-type]
    else:
        hist = train_global(sn, make_targets(spec, canons, data, routed=routed, normalize=normalize_targets), train)
    return FSMergeResult(fold(sn, models), sn, hist, time.perf_counter() - t0)


def fs_merge_sequential(
    spec: Spec,
    models: Sequence[Mapping[str, Tensor]],
    data: Sequence[Inputs],
    *,
    rank: Rank = 16,
    hidden_rank: Rank | None = None,
    train: TrainConfig = TrainConfig(epochs=50),
    last_train: TrainConfig | None = None,
    normalize_targets: bool = False,
    seed: int = 0,
) -> FSMergeResult:
    """FS-Merge seq. (App. B.4): ``merged ← model 1``; for t = 2..n a SuperNet over (merged, model t) with
    "first" init, trained (routed, globally) to reconstruct the original features of tasks 1..t, then
    folded. ``U_final``'s blocks of the earlier tasks start from the previous stage's (official code).
    Only two models' weights are inside a SuperNet at a time. ``last_train``: the last stage's recipe
    (the paper: 50 epochs per stage, 200 for the last)."""
    if len(models) != len(data) or len(models) < 2:
        raise ValueError("fs_merge_sequential: needs >= 2 models and one data set per model")
    t0 = time.perf_counter()
    canons = [canonical_fp32(spec, m) for m in models]
    # intermediate merges stay fp32: folding into bf16 at every stage would round n-1 times
    merged = {k: v.float() if v.is_floating_point() else v for k, v in models[0].items()}
    prev: Factor | None = None
    hist: list[tuple[int, float]] = []
    for t in range(1, len(models)):
        pair = [merged, {k: v.float() if v.is_floating_point() else v for k, v in models[t].items()}]
        sn = build_supernet(spec, pair, rank=rank, hidden_rank=hidden_rank, init="first", n_out=t + 1, seed=seed + t)
        if prev is not None:
            _carry_unmerge(prev, sn.f("u_final"))
        cfg = last_train if (last_train is not None and t == len(models) - 1) else train
        targets = make_targets(spec, canons, data, routed=True, normalize=normalize_targets, tasks=range(t + 1))
        hist += train_global(sn, targets, cfg)
        folded = fold(sn, pair)
        merged = folded.state_dict
        prev = sn.f("u_final")
    # the final model in the models' own dtypes
    folded.state_dict = {k: v.to(models[0][k].dtype) for k, v in folded.state_dict.items()}
    return FSMergeResult(folded, sn, hist, time.perf_counter() - t0)


def _carry_unmerge(prev: Factor, new: Factor) -> None:
    """Blocks 0..t-1 of ``new`` (t+1 blocks) from ``prev`` (t blocks); block t stays the identity."""
    t = prev.n
    with torch.no_grad():
        if new.rank == "full":
            new.full[:t] = prev.full
            return
        new.diag[:t] = prev.diag
        if new.rank:
            new.a.copy_(prev.a)
            new.b[:, :t] = prev.b
            new.b[:, t] = 0.0  # block t = diag(1) + a·0 = I, gradients still reach b[:, t] through a
