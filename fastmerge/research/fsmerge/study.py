"""FS-Merge studies on sklearn's 8x8 digits: ``fastmerge lab fsmerge_mlp`` and ``fsmerge_vit``.

**fsmerge_mlp** -- the paper's Table 2 analogue (MNIST halves -> digits halves). Task A = digits 0-4,
task B = digits 5-9 (5-way each, the lab's identity split: ~540 train / 180 test images per half). Per
depth L ∈ {1, 2, 3, 4} (width 128) and pair seed, two ReLU MLPs are trained from different random
inits (seeds 2s+1, 2s+2), one per half, each with its own head. Merging sees 64 unlabeled train images
per task (the paper's 64); the heads are never merged. Methods and recipes (paper App. E.1, steps cut
for the CPU budget, spec §2.8):

* Original models, output ensembles (not merges): logits (ZipIt's: each model + own head; joint = argmax
  over the concatenated logits) and features (the official code's ``(1/n) Σ f^j/mean|f^j|``);
* weight average; RegMean (α = 0.9, model k's Grams on task k's merge data); ZipIt (greedy matching,
  U = 2Mᵀ, on all merge data);
* distillation: average init, 1k full-batch SGD steps, lr 0.03, momentum 0.8, cosine (20 warm-up);
* FS-M (local, random init, dense M/U): 5k full-batch SGD steps, lr 0.1, momentum 0.9, step lr (the
  paper: 15k); FS-M, ZipIt init (local); FS-M global (average init, 1k steps, lr 0.1, momentum 0.8,
  cosine): targets of both models on all merge data, scaled to mean |f| = 1 (spec §2.7).

**fsmerge_vit** -- two lab TinyViTs (dim 48, depth 2, 4 heads, patch 2) trained from scratch from
different random inits on two digits tasks (``identity`` and ``rot90``, 10-way each; the lab zoo's
``scratch`` models, shared with its other experiments). Merge data, unlabeled: 16 or 64 originals per
task plus augmented copies (±1 px shifts, mixup λ ∈ [0.5, 1], Gaussian noise σ = 0.1) up to 512 per
task (the paper: 16-100 originals + 800-1000 augmented). Methods: ensembles, average, RegMean
(α = 0.9), distillation (all parameters, and LoRA r = 4; "first" init, task-routed), FS-Merge diagonal
and low rank (r = 12, hidden side 24; "first" init, task-routed global reconstruction). AdamW, batch
128, one-cycle schedule (the official ``main.py``), weight decay 1e-3, 100 epochs each; learning rates
picked on the val split.

Metrics (ZipIt's, spec §4): per-task accuracy = task k's head on task k's test images (averaged over
tasks); joint = the argmax over all heads' concatenated logits must be the right class of the right
task. ``--smoke``: tiny models, a few steps: seconds, the pipeline only.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..lab.data import Task, make_task
from ..lab.models import MLPConfig
from ..lab.report import write_table
from ..lab.train import accuracy, threads, train_cached
from .arch import MLPSpec, Spec, ViTSpec, canonical_fp32, features
from .baselines import average, distill, feature_ensemble, regmean, zipit
from .fold import Folded
from .train import TrainConfig, fs_merge

Tensor = torch.Tensor
SD = dict[str, Tensor]
NAME_MLP = "fsmerge_mlp"
NAME_VIT = "fsmerge_vit"
#: every FS-Merge study runs on one thread: small models are op-overhead bound (see TrainConfig.threads)
#: and results must not depend on the machine's core count
THREADS = 1


# ----------------------------------------------------------------------------------------------------
# data


def digit_halves(seed: int = 0) -> tuple[Task, Task]:
    """Digits 0-4 and 5-9 of the lab's identity task as two 5-way tasks (labels 0..4), same splits."""
    base = make_task("identity", seed)

    def half(lo: int) -> Task:
        parts = []
        for split in ("train", "val", "test"):
            x, y = base.split(split)
            keep = (y >= lo) & (y < lo + 5)
            parts += [x[keep].contiguous(), (y[keep] - lo).contiguous()]
        return Task(f"digits{lo}-{lo + 4}", *parts, n_classes=5, seed=seed)

    return half(0), half(5)


def merge_subset(task: Task, n: int, seed: int) -> Tensor:
    """``n`` train images of ``task`` drawn with ``seed`` (unlabeled: the labels are never returned)."""
    g = torch.Generator().manual_seed(seed)
    return task.x_train[torch.randperm(len(task.y_train), generator=g)[:n]]


def augment(x: Tensor, n_out: int, seed: int) -> Tensor:
    """``n_out`` augmented copies of the images ``x`` ``[N, 1, 8, 8]``: a random ±1 pixel shift (edge
    padding), mixup with another image of the same task (λ ~ U[0.5, 1]: the original stays dominant, as
    DeiT-style mixup keeps the label of the larger share) and Gaussian noise σ = 0.1 (the images are
    standardised). No flips or rotations: those *are* some of the lab's tasks."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    idx = torch.randint(0, n, (n_out,), generator=g)
    pad = torch.nn.functional.pad(x[idx], (1, 1, 1, 1), mode="replicate")
    dy = torch.randint(0, 3, (n_out,), generator=g)
    dx = torch.randint(0, 3, (n_out,), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(n_out, 1, 8, 10)
    shifted = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(n_out, 1, 8, 8)
    shifted = shifted.gather(3, cols)
    lam = 0.5 + 0.5 * torch.rand(n_out, 1, 1, 1, generator=g)
    other = x[torch.randint(0, n, (n_out,), generator=g)]
    return lam * shifted + (1 - lam) * other + 0.1 * torch.randn(shifted.shape, generator=g)


# ----------------------------------------------------------------------------------------------------
# evaluation


TaskFeatures = Callable[[Tensor], Sequence[Tensor]]


class Bench:
    """Per-task and joint accuracy of "task features" (one feature tensor per head) on a split."""

    def __init__(self, tasks: Sequence[Task], heads: Sequence[Mapping[str, Tensor]], split: str = "test"):
        self.data = [t.split(split) for t in tasks]
        self.heads = [(h["weight"].float(), h["bias"].float()) for h in heads]
        sizes = [h[0].shape[0] for h in self.heads]
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]

    def score(self, task_feats: TaskFeatures) -> tuple[float, float, list[float]]:
        """(mean per-task accuracy, mean joint accuracy, per-task accuracies)."""
        per, joint = [], []
        with torch.no_grad():
            for k, (x, y) in enumerate(self.data):
                fs = task_feats(x)
                logits = [f @ w.T + b for f, (w, b) in zip(fs, self.heads)]
                per.append(accuracy(logits[k], y))
                joint.append(accuracy(torch.cat(logits, dim=1), y + self.offsets[k]))
        return sum(per) / len(per), sum(joint) / len(joint), per


def folded_features(spec: Spec, folded: Folded) -> TaskFeatures:
    """Task features of a folded merge: ``f(x) U_k`` per head k."""
    canon = canonical_fp32(spec, folded.state_dict)
    return lambda x: (lambda f: [f @ u for u in folded.unmerge])(features(spec, canon, x))


def original_features(spec: Spec, sds: Sequence[SD]) -> TaskFeatures:
    """Task features of the original models: model k's features for head k."""
    canons = [canonical_fp32(spec, s) for s in sds]
    return lambda x: [features(spec, c, x) for c in canons]


def heads_of(sds: Sequence[SD]) -> list[dict[str, Tensor]]:
    """The lab models' ``head.weight`` / ``head.bias`` per model."""
    return [{"weight": s["head.weight"], "bias": s["head.bias"]} for s in sds]


@dataclasses.dataclass
class Row:
    """One method's result: accuracies in [0, 1] (joint None where undefined) and merge seconds."""

    per_task: float
    joint: float | None
    seconds: float


def _ens_scales(spec: Spec, sds: Sequence[SD], data: Sequence[Tensor]) -> list[float]:
    # the feature ensemble's per-model scales mean|f^j|, measured once on the merge data (never on test)
    x = torch.cat(list(data))
    return [float(features(spec, canonical_fp32(spec, s), x).abs().mean()) for s in sds]


def _timed(fn: Callable[[], Folded]) -> tuple[Folded, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fmt(vals: Sequence[float | None]) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{100 * v[0]:.2f}"
    return f"{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v):.2f}"


# ----------------------------------------------------------------------------------------------------
# the MLP study (paper Table 2)


@dataclasses.dataclass(frozen=True)
class MLPStudy:
    """Settings of ``fsmerge_mlp`` (see the module docstring)."""

    depths: tuple[int, ...] = (1, 2, 3, 4)
    width: int = 128
    seeds: int = 5
    merge_per_task: int = 64
    train_epochs: int = 30
    train_lr: float = 3e-3
    local_steps: int = 5000
    global_steps: int = 1000
    kd_steps: int = 1000
    alpha: float = 0.9


MLP_FULL = MLPStudy()
MLP_SMOKE = MLPStudy(depths=(1, 2), width=16, seeds=1, merge_per_task=16, train_epochs=2, local_steps=20,
                     global_steps=20, kd_steps=20)

MLP_METHODS = ["Original models", "Ensemble (logits)", "Ensemble (features)", "Average", "RegMean", "ZipIt",
               "Distillation", "FS-M (local)", "FS-M, ZipIt init (local)", "FS-M global (average init)"]


def mlp_pair(st: MLPStudy, depth: int, seed: int, tasks: Sequence[Task], cache_dir: Optional[Path]) -> list[SD]:
    """The two MLPs of pair ``seed`` (different inits: model seeds 2s+1 and 2s+2), one per half."""
    cfg = MLPConfig(64, (st.width,) * depth, 5)
    return [train_cached(cfg, t, epochs=st.train_epochs, lr=st.train_lr, seed=2 * seed + 1 + k, cache_dir=cache_dir).state_dict()
            for k, t in enumerate(tasks)]


def mlp_case(st: MLPStudy, sds: Sequence[SD], tasks: Sequence[Task], data: Sequence[Tensor]) -> dict[str, Row]:
    """Every method of the table on one pair of models."""
    spec = MLPSpec.from_state_dict(sds[0])
    bench = Bench(tasks, heads_of(sds))
    out: dict[str, Row] = {}
    p, _, _ = bench.score(original_features(spec, sds))
    out["Original models"] = Row(p, None, 0.0)
    p, j, _ = bench.score(original_features(spec, sds))
    out["Ensemble (logits)"] = Row(p, j, 0.0)
    scales = _ens_scales(spec, sds, data)
    p, j, _ = bench.score(lambda x: feature_ensemble(spec, sds, x, scales))
    out["Ensemble (features)"] = Row(p, j, 0.0)

    sgd = dict(batch_size=None, optimizer="sgd", threads=THREADS)
    # cosine with the paper's 20-step warm-up (App. E.1: "a single cycle with 20-epoch warmup")
    warm = lambda steps: 20 / max(steps, 20)  # noqa: E731
    runs: dict[str, Callable[[], Folded]] = {
        "Average": lambda: average(spec, sds),
        "RegMean": lambda: regmean(spec, sds, data, alpha=st.alpha),
        "ZipIt": lambda: zipit(spec, sds, data),
        "Distillation": lambda: distill(
            spec, sds, data, init="average", routed=False, normalize_targets=True,
            train=TrainConfig(steps=st.kd_steps, lr=0.03, momentum=0.8, schedule="cosine", warmup=warm(st.kd_steps), **sgd))[0],
        "FS-M (local)": lambda: fs_merge(
            spec, sds, data, rank="full", init="random", mode="local",
            train=TrainConfig(steps=st.local_steps, lr=0.1, momentum=0.9, schedule="step", **sgd)).folded,
        "FS-M, ZipIt init (local)": lambda: fs_merge(
            spec, sds, data, rank="full", init="zipit", mode="local",
            train=TrainConfig(steps=st.local_steps, lr=0.1, momentum=0.9, schedule="step", **sgd)).folded,
        "FS-M global (average init)": lambda: fs_merge(
            spec, sds, data, rank="full", init="average", mode="global", routed=False, normalize_targets=True,
            train=TrainConfig(steps=st.global_steps, lr=0.1, momentum=0.8, schedule="cosine",
                              warmup=warm(st.global_steps), **sgd)).folded,
    }
    for name, fn in runs.items():
        folded, secs = _timed(fn)
        p, j, _ = bench.score(folded_features(spec, folded))
        out[name] = Row(p, j, secs)
    return out


def mlp_results(st: MLPStudy, cache_dir: Optional[Path]) -> dict[int, list[dict[str, Row]]]:
    """depth -> one {method: Row} per pair seed."""
    tasks = list(digit_halves(0))
    res: dict[int, list[dict[str, Row]]] = {}
    with threads(THREADS):
        for depth in st.depths:
            res[depth] = []
            for s in range(st.seeds):
                sds = mlp_pair(st, depth, s, tasks, cache_dir)
                data = [merge_subset(t, st.merge_per_task, 1000 * s + k) for k, t in enumerate(tasks)]
                res[depth].append(mlp_case(st, sds, tasks, data))
    return res


def run_mlp(out_dir: Path, cache_dir: Optional[Path], smoke: bool) -> Path:
    """``fastmerge lab fsmerge_mlp``: writes ``out_dir/fsmerge_mlp/fsmerge_mlp.md``."""
    t0 = time.perf_counter()
    st = MLP_SMOKE if smoke else MLP_FULL
    res = mlp_results(st, cache_dir)
    d = Path(out_dir) / NAME_MLP
    d.mkdir(parents=True, exist_ok=True)
    header = ["Method"] + [f"{L} hidden layer{'s' if L > 1 else ''}" for L in st.depths]
    per = [[m] + [_fmt([r[m].per_task for r in res[L]]) for L in st.depths] for m in MLP_METHODS]
    joint = [[m] + [_fmt([r[m].joint for r in res[L]]) for L in st.depths] for m in MLP_METHODS if m != "Original models"]
    secs = [[m] + [f"{statistics.mean(r[m].seconds for r in res[L]):.1f}" for L in st.depths]
            for m in MLP_METHODS if res[st.depths[0]][0][m].seconds > 0]
    paper = [["Two models", "96.83", "96.51", "96.46", "95.86"], ["Ensemble", "94.70", "95.14", "95.73", "95.58"],
             ["average", "94.36", "85.90", "78.78", "61.76"], ["RegMean", "95.90", "92.97", "92.11", "87.79"],
             ["ZipIt", "96.35", "95.75", "95.43", "94.59"], ["Distillation", "93.35", "93.13", "93.71", "93.38"],
             ["FS-M", "95.89", "95.68", "95.37", "94.94"], ["FS-M, ZipIt init", "96.62", "96.29", "96.18", "95.63"]]
    sections = [
        (f"Per-task test accuracy (%), mean ± std over {st.seeds} pair seed(s)", header, per),
        ("Joint test accuracy (%): argmax over both heads' 10 logits", header, joint),
        ("Merge time (s, one thread, mean over seeds)", header, secs),
        ("The paper's Table 2 (MNIST halves, width 128, 5 seeds), per-task, for comparison",
         ["Model", "1", "2", "3", "4"], paper),
    ]
    notes = _mlp_findings(res, st)
    return write_table(d / f"{NAME_MLP}.md", "FS-Merge on MLPs: digits halves (paper Table 2 analogue)", sections,
                       notes, command=f"fastmerge lab {NAME_MLP}" + (" --smoke" if smoke else ""),
                       seconds=time.perf_counter() - t0, smoke=smoke)


def _mean_of(res: Mapping[int, list[dict[str, Row]]], method: str, depth: int, joint: bool = False) -> float:
    return statistics.mean((r[method].joint if joint else r[method].per_task) or 0.0 for r in res[depth])


def _mlp_findings(res: Mapping[int, list[dict[str, Row]]], st: MLPStudy) -> list[str]:
    merges = [m for m in MLP_METHODS if m not in ("Original models", "Ensemble (logits)", "Ensemble (features)")]
    pct = lambda m, L, joint=False: f"{100 * _mean_of(res, m, L, joint):.2f} %"  # noqa: E731
    notes = []
    for L in st.depths:
        best = max(merges, key=lambda m: _mean_of(res, m, L))
        best_j = max(merges, key=lambda m: _mean_of(res, m, L, True))
        notes.append(f"{L} hidden layer(s): best merge per-task {best} ({pct(best, L)}; originals "
                     f"{pct('Original models', L)}), best joint {best_j} ({pct(best_j, L, True)}; logit ensemble "
                     f"{pct('Ensemble (logits)', L, True)}).")
    a = [_mean_of(res, "Average", L) for L in st.depths]
    notes.append("Weight averaging vs depth: " + " -> ".join(f"{100 * v:.1f}" for v in a) + " % per-task (paper: "
                 "94.4 -> 85.9 -> 78.8 -> 61.8 %); differently initialised MLPs are not aligned.")
    wins = [L for L in st.depths if _mean_of(res, "FS-M, ZipIt init (local)", L) >= _mean_of(res, "ZipIt", L)]
    notes.append(f"FS-M with ZipIt init >= ZipIt (its own init) per-task at depths {wins} of {list(st.depths)}; "
                 f">= distillation at depths "
                 f"{[L for L in st.depths if _mean_of(res, 'FS-M, ZipIt init (local)', L) >= _mean_of(res, 'Distillation', L)]}.")
    notes.append("The test halves have ~180 images each: one image is 0.56 points of a task's accuracy, so "
                 "differences below ~1 point are within noise; the digits are easier than MNIST (originals ~98 %).")
    notes.append("Ensemble (logits) per-task equals the original models by construction (each task's head reads its "
                 "own model); its joint accuracy is the reference for merges. Ensemble (features) is the official "
                 "code's (1/n) Σ f^j/mean|f^j| fed to each task's head: with linear heads the own model's term "
                 "dominates, so it stays close to the originals even though the feature spaces are not aligned.")
    notes.append(f"Steps are cut for the CPU budget: local FS-M {st.local_steps} (paper 15k), global FS-M and "
                 f"distillation {st.global_steps} / {st.kd_steps} (paper 1k). Local FS-M divides each layer's "
                 "problem by mean|f_l| (exact for ReLU; without it one random-init seed in three collapsed).")
    return notes


# ----------------------------------------------------------------------------------------------------
# the ViT study


@dataclasses.dataclass(frozen=True)
class ViTStudy:
    """Settings of ``fsmerge_vit`` (see the module docstring)."""

    tasks: tuple[str, ...] = ("identity", "rot90")
    model_seeds: tuple[int, ...] = (0, 1)
    originals: tuple[int, ...] = (16, 64)  # per task; the rest of per_task is augmented
    per_task: int = 512
    rank: int = 12
    fs_epochs: int = 100
    fs_lr: float = 1e-2
    fs_diag_lr: float = 3e-2
    kd_epochs: int = 100
    kd_lr: float = 3e-3
    lora_rank: int = 4
    lora_lr: float = 1e-2
    weight_decay: float = 1e-3
    alpha: float = 0.9


VIT_FULL = ViTStudy()
VIT_SMOKE = ViTStudy(originals=(8,), per_task=16, rank=2, fs_epochs=2, kd_epochs=2)

VIT_METHODS = ["Original models", "Ensemble (logits)", "Ensemble (features)", "Average", "RegMean", "Distillation",
               "Distillation, LoRA", "FS-Merge, diagonal", "FS-Merge, low rank"]


def vit_results(
    st: ViTStudy, cache_dir: Optional[Path], smoke: bool
) -> tuple[dict[int, dict[str, Row]], dict[str, int], list[float], object]:
    """{originals per task: {method: Row}}, learnable parameter counts, the original models' own accuracies,
    and the model config."""
    from ..lab.zoo import Zoo

    zoo = Zoo("vit", cache_dir=cache_dir, smoke=smoke, tasks=st.tasks)
    with threads(THREADS):
        sds = [zoo.scratch(t, s).state_dict() for t, s in zip(st.tasks, st.model_seeds)]
        tasks = [zoo.tasks[t] for t in st.tasks]
        cfg = zoo.config
        spec = ViTSpec.from_state_dict(sds[0], heads=cfg.heads, patch=cfg.patch)
        bench = Bench(tasks, heads_of(sds))
        p_orig, j_orig, per = bench.score(original_features(spec, sds))
        adamw = dict(batch_size=128, optimizer="adamw", schedule="onecycle", weight_decay=st.weight_decay, threads=THREADS)
        counts: dict[str, int] = {}
        res: dict[int, dict[str, Row]] = {}
        for n0 in st.originals:
            data = []
            for k, t in enumerate(tasks):
                x0 = merge_subset(t, n0, 2000 + k)
                data.append(torch.cat([x0, augment(x0, st.per_task - n0, 3000 + k)]))
            out: dict[str, Row] = {"Original models": Row(p_orig, None, 0.0), "Ensemble (logits)": Row(p_orig, j_orig, 0.0)}
            scales = _ens_scales(spec, sds, data)
            p, j, _ = bench.score(lambda x: feature_ensemble(spec, sds, x, scales))
            out["Ensemble (features)"] = Row(p, j, 0.0)

            def fs(rank: int, lr: float) -> Folded:
                r = fs_merge(spec, sds, data, rank=rank, init="first",
                             train=TrainConfig(epochs=st.fs_epochs, lr=lr, **adamw))
                counts[f"FS-Merge, {'diagonal' if rank == 0 else 'low rank'}"] = r.supernet.n_learnable()
                return r.folded

            runs: dict[str, Callable[[], Folded]] = {
                "Average": lambda: average(spec, sds),
                "RegMean": lambda: regmean(spec, sds, data, alpha=st.alpha),
                "Distillation": lambda: distill(spec, sds, data, init="first",
                                                train=TrainConfig(epochs=st.kd_epochs, lr=st.kd_lr, **adamw))[0],
                "Distillation, LoRA": lambda: distill(spec, sds, data, init="first", lora_rank=st.lora_rank,
                                                      train=TrainConfig(epochs=st.kd_epochs, lr=st.lora_lr, **adamw))[0],
                "FS-Merge, diagonal": lambda: fs(0, st.fs_diag_lr),
                "FS-Merge, low rank": lambda: fs(st.rank, st.fs_lr),
            }
            for name, fn in runs.items():
                folded, secs = _timed(fn)
                p, j, _ = bench.score(folded_features(spec, folded))
                out[name] = Row(p, j, secs)
            res[n0] = out
        c0 = canonical_fp32(spec, sds[0])
        d_out = spec.feature_dim(c0)
        adapters = len(sds) * d_out * d_out  # the students' per-task output adapters (FS-Merge: U_final)
        counts["Distillation"] = sum(v.numel() for v in c0.values()) + adapters
        counts["Distillation, LoRA"] = adapters + sum(st.lora_rank * sum(c0[f"{n}.w"].shape) for n in spec.linear_names()
                                                      if f"{n}.w" in c0)
    return res, counts, per, cfg


def run_vit(out_dir: Path, cache_dir: Optional[Path], smoke: bool) -> Path:
    """``fastmerge lab fsmerge_vit``: writes ``out_dir/fsmerge_vit/fsmerge_vit.md``."""
    t0 = time.perf_counter()
    st = VIT_SMOKE if smoke else VIT_FULL
    res, counts, per, cfg = vit_results(st, cache_dir, smoke)
    d = Path(out_dir) / NAME_VIT
    d.mkdir(parents=True, exist_ok=True)
    header = ["Method", "Per-task (%)", "Joint (%)", "Learnable parameters", "Merge time (s)"]
    sections = []
    for n0, rr in res.items():
        rows = []
        for m in VIT_METHODS:
            r = rr[m]
            rows.append([m, f"{100 * r.per_task:.2f}", "-" if r.joint is None else f"{100 * r.joint:.2f}",
                         f"{counts[m]:,}" if m in counts else "-", f"{r.seconds:.1f}" if r.seconds else "-"])
        sections.append((f"{n0} original + {st.per_task - n0} augmented images per task", header, rows))
    notes = [
        f"Tasks {st.tasks[0]} and {st.tasks[1]} (10-way each); lab TinyViT (dim {cfg.dim}, depth {cfg.depth}, "
        f"{cfg.heads} heads, patch {cfg.patch}) trained from scratch with seeds {st.model_seeds} (different inits); "
        "the original models reach " + ", ".join(f"{100 * a:.2f} %" for a in per) + " on their own test sets.",
        "Average and RegMean fail on differently initialised transformers, as in the paper (Tables 1, 3).",
    ]
    for n0, rr in res.items():
        fs_best = max(("FS-Merge, low rank", "FS-Merge, diagonal"), key=lambda m: rr[m].per_task)
        notes.append(f"{n0} originals per task: {fs_best} {100 * rr[fs_best].per_task:.2f} % per-task / "
                     f"{100 * rr[fs_best].joint:.2f} % joint vs distillation {100 * rr['Distillation'].per_task:.2f} % / "
                     f"{100 * rr['Distillation'].joint:.2f} %; the ensemble of the originals has "
                     f"{100 * rr['Ensemble (logits)'].joint:.2f} % joint.")
    notes += [
        "The paper's advantage of FS-Merge over distillation with scarce data (its Fig. 4, ViT-B-16: 86M-parameter "
        "students) does not carry over to this toy: the distillation student here has "
        f"{counts['Distillation']:,} parameters and little room to overfit 1,024 samples, and at width "
        f"{cfg.dim} a rank-{st.rank} factor is not small (FS-Merge low rank learns {counts['FS-Merge, low rank']:,} "
        "parameters; at d = 768, r = 12 it would be ~2% of d per factor).",
        f"FS-Merge low rank: r = {st.rank} (hidden side {st.rank * 2}), lr {st.fs_lr}; diagonal lr {st.fs_diag_lr}; "
        f"distillation lr {st.kd_lr}, LoRA r = {st.lora_rank} lr {st.lora_lr}; {st.fs_epochs} / {st.kd_epochs} epochs, "
        "AdamW, batch 128, one-cycle. Learning rates from a coarse search on the val split, 64-original setting: "
        "FS-Merge r = 4 at 1e-3 / 1e-2 / 3e-2 (3e-2 diverged), r = 12 at 3e-3 / 1e-2; distillation at 1e-3 / 3e-3.",
        "The distillation student also gets a per-task d_out x d_out output adapter (the counterpart of FS-Merge's "
        "U_final), so both have the same head-side capacity.",
        "One pair, one data seed: per-task accuracy is over 360 test images per task (0.28 points per image).",
    ]
    return write_table(d / f"{NAME_VIT}.md", "FS-Merge on tiny ViTs: two digits tasks, different initialisations",
                       sections, notes, command=f"fastmerge lab {NAME_VIT}" + (" --smoke" if smoke else ""),
                       seconds=time.perf_counter() - t0, smoke=smoke)
