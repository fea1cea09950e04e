"""Experiment 5: is M-Loss a predictor of what merging loses against ensembling?
(M-Loss: Quantifying Model Merging Compatibility with Limited Unlabeled Data, https://arxiv.org/abs/2602.08564)

For groups of models, the layer-level M-Loss (``fastmerge.mloss.module_mloss`` on the linear layers
feeding an activation, 64 unlabeled val images per task of the group) against the accuracy gap
"ensemble − weight average" on the test split; Spearman's ρ per family of groups and pooled:

- task pairs and groups: the eight frozen-head task fine-tunes of experiment 4 (all 28 pairs, five triples,
  five quadruples and all eight); merged = the average body, ensemble = the averaged features, both read
  by each task's own head, accuracy averaged over the group's tasks;
- seed pairs: the ten identity fine-tunes with random hyperparameters of experiment 1 (45 pairs);
- independent pairs: the ten from-scratch identity models of experiment 1 (45 pairs): not aligned, M-Loss
  and gaps are expected to be large.

Merged and ensemble of a seed or independent pair: the uniform soup of the whole models vs their logit
ensemble. M-Loss statistics: the layer M-Loss (Def. 3.3) summed over the target layers, and the
normalised layer M-Loss (Def. 3.5) averaged over them; inputs from the shared base ("base" mode, the
official code; for independent models there is no base, so the paper's "progressive" mode is used).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..analysis import GapEntry, gap_table, spearman
from ..ensemble import FeatureEnsemble, LogitEnsemble
from ..soups import uniform_soup
from .common import Timer, command, out_dir_for, single_thread
from .data import TASK_NAMES
from .exp_multitask import SMOKE_TASKS, mloss_targets
from .report import pyplot, write_table
from .train import evaluate
from .zoo import Zoo, body, head

NAME = "mloss"
TASK = "identity"


def _mloss(models, calib: torch.Tensor, targets, base) -> tuple[float, float]:
    from ...mloss import module_mloss

    res = module_mloss(models, [calib], targets, base=base, mode="base" if base is not None else "progressive",
                       backend="torch")
    layer = sum(v.layer for v in res.losses.values())
    norm = sum(v.layer_norm for v in res.losses.values()) / len(res.losses)
    return layer, norm


def _groups(names: Sequence[str], smoke: bool) -> list[tuple[str, ...]]:
    pairs = list(itertools.combinations(names, 2))
    if smoke:
        return pairs[:3]
    rng = random.Random(0)
    out = pairs[:]
    for k in (3, 4):
        out += [tuple(sorted(rng.sample(list(names), k), key=list(names).index)) for _ in range(5)]
    out.append(tuple(names))
    return out


def family_tasks(zoo: Zoo, smoke: bool) -> list[tuple[GapEntry, GapEntry]]:
    """(entry with layer M-Loss, entry with normalised M-Loss) for every task group."""
    names = list(zoo.tasks)
    fts = {t: zoo.finetuned_body(t) for t in names}
    heads = {t: head(fts[t].state_dict()) for t in names}
    base = zoo.model({**zoo.pretrained_body(), **heads[names[0]]})
    targets = mloss_targets(zoo.kind, zoo.config)
    out = []
    for g in _groups(names, smoke):
        ms = [fts[t] for t in g]
        avg = uniform_soup([body(m.state_dict()) for m in ms])
        merged = sum(evaluate(zoo.model({**avg, **heads[t]}), zoo.tasks[t]) for t in g) / len(g)
        ens = sum(evaluate(FeatureEnsemble(ms, head=fts[t].head), zoo.tasks[t]) for t in g) / len(g)
        calib = torch.cat([zoo.tasks[t].x_val[:64] for t in g])
        layer, norm = _mloss(ms, calib, targets, base)
        label = "+".join(g) if len(g) < len(names) else "all eight"
        out.append((GapEntry(label, layer, merged, ens), GapEntry(label, norm, merged, ens)))
    return out


def family_seeds(zoo: Zoo, smoke: bool, scratch: bool) -> list[tuple[GapEntry, GapEntry]]:
    """The same for pairs of identity models: fine-tunes with random hyperparameters, or from-scratch ones."""
    n = 3 if smoke else 10
    task = zoo.tasks[TASK]
    ms = [zoo.scratch(TASK, s) if scratch else zoo.finetuned_hp(TASK, s) for s in range(n)]
    base = None if scratch else zoo.probe(TASK)
    targets = mloss_targets(zoo.kind, zoo.config)
    calib = task.x_val[:64]
    out = []
    for i, j in itertools.combinations(range(n), 2):
        pair = [ms[i], ms[j]]
        merged = evaluate(zoo.model(uniform_soup([m.state_dict() for m in pair])), task)
        ens = evaluate(LogitEnsemble(pair), task)
        layer, norm = _mloss(pair, calib, targets, base)
        out.append((GapEntry(f"seeds {i}+{j}", layer, merged, ens), GapEntry(f"seeds {i}+{j}", norm, merged, ens)))
    return out


FAMILIES = {"tasks": "task groups (8 frozen-head fine-tunes)", "seeds": "seed pairs (random hyperparameters)",
            "scratch": "independent-init pairs"}


def run(out_dir: Path, cache_dir: Optional[Path], smoke: bool) -> Path:
    """Write ``mloss.md`` and ``mloss.png`` (M-Loss vs gap scatter) under ``out_dir/mloss``."""
    timer = Timer()
    d = out_dir_for(out_dir, NAME)
    try:
        import fastmerge.mloss  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return write_table(d / "mloss.md", "M-Loss as a predictor of the merging-ensembling gap",
                           [("", ["status"], [[f"pending fastmerge.mloss ({type(e).__name__}: {e})"]])], [],
                           command=command(NAME, smoke), seconds=timer(), smoke=smoke)
    data: dict[tuple[str, str], list[tuple[GapEntry, GapEntry]]] = {}
    with single_thread():
        for kind in ("mlp", "vit"):
            zoo = Zoo(kind, cache_dir=cache_dir, smoke=smoke, tasks=SMOKE_TASKS if smoke else TASK_NAMES)
            data[(kind, "tasks")] = family_tasks(zoo, smoke)
            data[(kind, "seeds")] = family_seeds(zoo, smoke, scratch=False)
            data[(kind, "scratch")] = family_seeds(zoo, smoke, scratch=True)
    sections, notes = [], []
    summary = []
    for kind in ("mlp", "vit"):
        pooled_l, pooled_n = [], []
        for fam, label in FAMILIES.items():
            es = data[(kind, fam)]
            pooled_l += [e[0] for e in es]
            pooled_n += [e[1] for e in es]
            rho_l = spearman([e[0].mloss for e in es], [e[0].gap for e in es])
            rho_n = spearman([e[1].mloss for e in es], [e[1].gap for e in es])
            summary.append([kind.upper(), label, len(es), f"{rho_l:+.3f}", f"{rho_n:+.3f}",
                            f"{100 * sum(e[0].gap for e in es) / len(es):+.2f}"])
        rho_l = spearman([e.mloss for e in pooled_l], [e.gap for e in pooled_l])
        rho_n = spearman([e.mloss for e in pooled_n], [e.gap for e in pooled_n])
        summary.append([kind.upper(), "pooled", len(pooled_l), f"{rho_l:+.3f}", f"{rho_n:+.3f}",
                        f"{100 * sum(e.gap for e in pooled_l) / len(pooled_l):+.2f}"])
        notes.append(f"{kind.upper()}: pooled Spearman ρ(M-Loss, ensemble − merged) = {rho_l:+.3f} (layer M-Loss), "
                     f"{rho_n:+.3f} (normalised) - "
                     + ("agrees with the M-Loss paper (higher M-Loss, larger loss of merging)." if rho_l > 0.3
                        else "does NOT support the M-Loss paper's claim at this scale."))
    sections.append(("Spearman ρ between M-Loss and the gap (ensemble − merged accuracy)",
                     ["model", "family", "groups", "ρ layer M-Loss", "ρ normalised M-Loss", "mean gap (points)"],
                     summary))
    for kind in ("mlp", "vit"):
        rows, _ = gap_table([e[0] for e in data[(kind, "tasks")]])
        sections.append((f"{kind.upper()}: task groups (layer M-Loss summed over targets; accuracies %)",
                         ["group", "M-Loss", "merged", "ensemble", "gap"], rows))
    for kind in ("mlp", "vit"):
        for fam in ("seeds", "scratch"):
            es = [e[0] for e in data[(kind, fam)]]
            lo = min(es, key=lambda e: e.mloss)
            hi = max(es, key=lambda e: e.mloss)
            notes.append(f"{kind.upper()}, {FAMILIES[fam]}: M-Loss {lo.mloss:.3g} to {hi.mloss:.3g}, gap "
                         f"{100 * min(e.gap for e in es):+.2f} to {100 * max(e.gap for e in es):+.2f} points.")
    for kind in ("mlp", "vit"):
        fam_rho = {fam: spearman([e[0].mloss for e in data[(kind, fam)]], [e[0].gap for e in data[(kind, fam)]])
                   for fam in FAMILIES}
        within = [f"{fam} {r:+.2f}" for fam, r in fam_rho.items()]
        weak = [fam for fam, r in fam_rho.items() if not r > 0.3]
        notes.append(f"{kind.upper()}: within-family ρ (layer M-Loss): {', '.join(within)}"
                     + (f"; weak or negative within {', '.join(weak)}: there M-Loss does not rank the gaps, and a "
                        "pooled ρ mainly separates the families (one test example = 0.28 points of gap)."
                        if weak else "."))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("mlp", "vit")):
        for fam, label in FAMILIES.items():
            es = [e[0] for e in data[(kind, fam)]]
            ax.scatter([e.mloss for e in es], [100 * e.gap for e in es], s=14, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("layer M-Loss (sum over target layers)")
        ax.set_ylabel("ensemble − merged accuracy (points)")
        ax.set_title(kind.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "mloss.png", dpi=100)
    plt.close(fig)
    return write_table(d / "mloss.md", "M-Loss as a predictor of the merging-ensembling gap", sections, notes,
                       images=["mloss.png"], command=command(NAME, smoke), seconds=timer(), smoke=smoke)
