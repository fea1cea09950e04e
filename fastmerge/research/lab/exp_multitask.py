"""Experiment 4: merging eight task fine-tunes (task arithmetic's setting) with fastmerge's methods.

One pretrained model, eight fine-tunes (identity, rot90/180/270, hflip, invert, block_shuffle,
label_perm), each trained with its linear-probe head frozen, so that a task vector θ_t − θ_0 lives in
the body and every merged body is evaluated with each task's own head. Methods (fastmerge's
``merge_tensors`` per tensor, ``fastmerge.research.cart`` for CART, ``fastmerge.mloss`` for M-TIES), with the
scaling coefficient λ chosen on the val split from {0.05, 0.1, 0.2, ..., 1.0, 1.5} as task arithmetic and CART do:
weight average, task arithmetic, TIES (k = 0.2 and 0.8), DARE-TIES (k = 0.5), CART (rank 8 %), M-TIES
(k = 0.8, e = 0.1), the feature ensemble of the eight fine-tunes (with the task's head; by linearity of the
head this is also their logit ensemble), and the bounds: pretrained body + probe head, individual
fine-tunes, and one multi-task model. Accuracy on the test split, averaged over tasks; normalised
accuracy = merged / individual per task, averaged.

CART's rank sweep (paper Fig. 1: the "bell curve"; Fig. 2: reverse order keeps the smallest singular
triplets) is plotted for centred (CART) and uncentred (low-rank task arithmetic) task vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from .. import cart as cart_api
from ...api import merge_tensors
from ..ensemble import FeatureEnsemble
from .common import Timer, command, out_dir_for, single_thread
from .report import fmt_pct, pyplot, verdict, write_table
from .train import evaluate
from .data import TASK_NAMES
from .zoo import Zoo, body, head

NAME = "multitask"
#: CART's grid (0.05, 0.1, 0.2, ..., 1.0) plus 1.5; for 8 tasks, task arithmetic at λ = 1/8 is the weight average
LAMBDAS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5]
RATIOS = [0.0, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.75, 1.0]
#: --smoke: three tasks (one rotation, one label permutation) keep the pipeline check to seconds
SMOKE_TASKS = ("identity", "rot90", "label_perm")
SD = dict[str, torch.Tensor]


def mloss_targets(kind: str, config) -> list:
    """The linear layers feeding an activation, for M-Loss (the lab's models apply activations functionally,
    so ``find_targets`` cannot see them)."""
    from ...mloss import Target

    if kind == "mlp":
        return [Target(f"fc{i + 1}", "relu") for i in range(len(config.hidden))]
    return [Target(f"blocks.{i}.mlp.fc1", "gelu") for i in range(config.depth)]


def merge_bodies(method: str, bodies: Sequence[SD], base: SD | None, **params) -> SD:
    """``merge_tensors(method, ...)`` key by key (tensor_name = the key: random methods draw per tensor), fp32."""
    return {k: merge_tensors(method, [b[k] for b in bodies], None if base is None else base[k], tensor_name=k,
                             out_dtype=torch.float32, **params) for k in bodies[0]}


class Bench:
    """Evaluates merged bodies with each task's head: accuracy per task on a split."""

    def __init__(self, zoo: Zoo, heads: Mapping[str, SD]):
        self.zoo, self.heads = zoo, heads

    def accs(self, b: SD, split: str = "test") -> dict[str, float]:
        return {t: evaluate(self.zoo.model({**b, **self.heads[t]}), task, split) for t, task in self.zoo.tasks.items()}

    def mean(self, b: SD, split: str = "val") -> float:
        a = self.accs(b, split)
        return sum(a.values()) / len(a)


def tune(bench: Bench, make: Callable[[float], SD], lambdas: Sequence[float]) -> tuple[float, SD]:
    """(best λ on the val split, its merged body); ties go to the smaller λ."""
    best = None
    for lam in lambdas:
        b = make(lam)
        s = bench.mean(b, "val")
        if best is None or s > best[0]:
            best = (s, lam, b)
    assert best is not None
    return best[1], best[2]


def lowrank_ta(bodies: Sequence[SD], base: SD, ratio: float, lam: float, order: str, centred: bool) -> SD:
    """θ + λ·Σ_t SVD_k(θ_t − θ) on 2-D tensors (θ = θ_avg centred, θ_0 otherwise), plain (centred: average,
    else task arithmetic with λ) on the others; ratio 0 keeps θ."""
    out = {}
    for k in bodies[0]:
        xs = [b[k].float() for b in bodies]
        origin = None if centred else base[k].float()
        if xs[0].dim() == 2 and ratio > 0:
            theta, terms = cart_api.lowrank_terms(xs, origin=origin, rank_ratio=ratio, order=order, svd="exact")
            out[k] = theta + lam * sum(terms)
        elif centred:
            out[k] = sum(xs) / len(xs)
        else:
            out[k] = origin + lam * sum(x - origin for x in xs) if ratio > 0 or xs[0].dim() != 2 else origin.clone()
    return out


def results(kind: str, cache_dir: Optional[Path], smoke: bool) -> dict:
    zoo = Zoo(kind, cache_dir=cache_dir, smoke=smoke, tasks=SMOKE_TASKS if smoke else TASK_NAMES)
    names = list(zoo.tasks)
    base = zoo.pretrained_body()
    fts = {t: zoo.finetuned_body(t) for t in names}
    heads = {t: head(fts[t].state_dict()) for t in names}
    bodies = [body(fts[t].state_dict()) for t in names]
    bench = Bench(zoo, heads)
    lams = [1.0] if smoke else LAMBDAS
    T = len(names)
    rows: dict[str, tuple[dict[str, float], str]] = {}
    rows["pretrained body + probe head"] = (bench.accs(base), "-")
    rows["individual fine-tunes"] = ({t: evaluate(fts[t], zoo.tasks[t]) for t in names}, "-")
    mt = zoo.multitask()
    rows["multi-task model (upper bound)"] = ({t: evaluate(mt.for_task(t), zoo.tasks[t]) for t in names}, "-")
    rows["feature ensemble of the fine-tunes"] = (
        {t: evaluate(FeatureEnsemble(list(fts.values()), head=fts[t].head), zoo.tasks[t]) for t in names}, "-")
    avg = merge_bodies("linear", bodies, None, weight=1.0)
    rows["weight average"] = (bench.accs(avg), "-")
    lam, b = tune(bench, lambda x: merge_bodies("task_arithmetic", bodies, base, weight=x), lams)
    rows["task arithmetic"] = (bench.accs(b), f"λ={lam:g}")
    ta_lam = lam
    for k in (0.2, 0.8):
        lam, b = tune(bench, lambda x: merge_bodies("ties", bodies, base, weight=1.0, density=k, **{"lambda": x}), lams)
        rows[f"TIES (k={k:g})"] = (bench.accs(b), f"λ={lam:g}")
    lam, b = tune(bench, lambda x: merge_bodies("dare_ties", bodies, base, weight=1.0, density=0.5, **{"lambda": x}),
                  lams)
    rows["DARE-TIES (k=0.5)"] = (bench.accs(b), f"λ={lam:g}")
    lam, b = tune(bench, lambda x: lowrank_ta(bodies, base, 0.08, x, "top", True), lams)
    rows["CART (rank 8 %)"] = (bench.accs(b), f"λ={lam:g}")
    cart_lam = lam
    rows["M-TIES (k=0.8, e=0.1)"] = _mties(zoo, kind, fts, base, heads, bench, lams)
    # the rank sweep: CART at λ = 1 (the paper's choice) and at its tuned λ, low-rank task arithmetic at task
    # arithmetic's tuned λ
    sweep: dict[str, list[float]] = {}
    ratios = [0.0, 0.5, 1.0] if smoke else RATIOS
    for label, centred, order, lam in (("CART, top", True, "top", 1.0), ("CART, reverse", True, "reverse", 1.0),
                                       (f"CART, top, λ={cart_lam:g}", True, "top", cart_lam),
                                       ("TA low-rank, top", False, "top", ta_lam),
                                       ("TA low-rank, reverse", False, "reverse", ta_lam)):
        sweep[label] = [sum(bench.accs(lowrank_ta(bodies, base, r, lam, order, centred)).values()) / T for r in ratios]
    return {"names": names, "rows": rows, "sweep": sweep, "ratios": ratios, "zoo": zoo}


def _mties(zoo: Zoo, kind: str, fts, base: SD, heads, bench: Bench, lams) -> tuple[dict[str, float] | None, str]:
    try:
        from ...mloss import m_ties_modules
    except Exception as e:  # noqa: BLE001 - report any import failure in the table
        return None, f"pending fastmerge.mloss ({type(e).__name__})"
    # the base module needs a head of the fine-tunes' shape; heads are not used for evaluation
    names = list(fts)
    base_mod = zoo.model({**base, **heads[names[0]]})
    models = list(fts.values())
    calib = torch.cat([zoo.tasks[t].x_val[:16] for t in names])  # 16 unlabeled val images per task
    targets = mloss_targets(kind, zoo.config)

    def make(lam: float) -> SD:
        res = m_ties_modules(base_mod, models, [calib], targets, density=0.8, epsilon=0.1, lambda_=lam,
                             mode="progressive", backend="torch")
        return body(res.merged)

    lam, b = tune(bench, make, lams)
    return bench.accs(b), f"λ={lam:g}"


def run(out_dir: Path, cache_dir: Optional[Path], smoke: bool) -> Path:
    """Write ``multitask.md``, ``rank_sweep.png`` under ``out_dir/multitask``."""
    timer = Timer()
    d = out_dir_for(out_dir, NAME)
    with single_thread():
        res = {k: results(k, cache_dir, smoke) for k in ("mlp", "vit")}
    sections, notes = [], []
    for kind, r in res.items():
        names, rows = r["names"], r["rows"]
        ind = rows["individual fine-tunes"][0]
        table = []
        for label, (accs, hp) in rows.items():
            if accs is None:
                table.append([label, hp] + ["pending"] * (len(names) + 2))
                continue
            mean = sum(accs.values()) / len(accs)
            norm = sum(accs[t] / ind[t] for t in names if ind[t] > 0) / len(names)
            table.append([label, hp, fmt_pct(mean), fmt_pct(norm)] + [fmt_pct(accs[t]) for t in names])
        sections.append((f"{kind.upper()}: test accuracy (%)", ["method", "chosen", "average", "normalised"] + names,
                         table))
        sw = r["sweep"]
        sections.append((f"{kind.upper()}: rank sweep, average accuracy (%) by rank ratio",
                         ["rank ratio"] + list(sw), [[f"{x:g}"] + [fmt_pct(sw[k][i]) for k in sw]
                                                      for i, x in enumerate(r["ratios"])]))
        notes += _findings(kind, r)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (kind, r) in zip(axes, res.items()):
        for label, ys in r["sweep"].items():
            ax.plot([100 * x for x in r["ratios"]], [100 * y for y in ys], marker="o", label=label,
                    linestyle="--" if "reverse" in label else "-")
        ax.set_xlabel("rank ratio (% of full rank)")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(f"{kind.upper()}: eight-task merge by kept rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "rank_sweep.png", dpi=100)
    plt.close(fig)
    return write_table(d / "multitask.md", "Multi-task merging of eight digit tasks", sections, notes,
                       images=["rank_sweep.png"], command=command(NAME, smoke), seconds=timer(), smoke=smoke)


def _mean(accs: Mapping[str, float] | None) -> float:
    return float("nan") if accs is None else sum(accs.values()) / len(accs)


def _findings(kind: str, r: dict) -> list[str]:
    rows, sw, ratios = r["rows"], r["sweep"], r["ratios"]
    m = {k: _mean(v[0]) for k, v in rows.items()}
    K = kind.upper()
    notes = []
    ta, avg, cart = m["task arithmetic"], m["weight average"], m["CART (rank 8 %)"]
    notes.append(f"{K}: task arithmetic {fmt_pct(ta)} vs weight average {fmt_pct(avg)} - "
                 f"{verdict(ta, avg, 'task arithmetic: a tuned λ beats the plain average')}.")
    notes.append(f"{K}: CART (rank 8 %) {fmt_pct(cart)} vs task arithmetic {fmt_pct(ta)} and TIES (k=0.2) "
                 f"{fmt_pct(m['TIES (k=0.2)'])} - {verdict(cart, max(ta, m['TIES (k=0.2)']), 'CART Table 1: CART above both')}.")
    for key in [k for k in sw if k.startswith("CART, top")]:
        top = sw[key]
        if len(top) < 3:
            continue
        inner = top[1:-1]
        hi, lo = max(inner), min(inner)
        at_hi, at_lo = ratios[1 + inner.index(hi)], ratios[1 + inner.index(lo)]
        bell = hi > top[0] and hi > top[-1]
        dip = lo < top[0] - 0.01 and at_lo < at_hi
        notes.append(f"{K}: {key} by rank: {fmt_pct(top[0])} at rank 0 (= weight average), best {fmt_pct(hi)} at "
                     f"{100 * at_hi:g} % of the rank, {fmt_pct(top[-1])} at full rank (= weight average again)"
                     + (f", after a dip to {fmt_pct(lo)} at {100 * at_lo:g} %" if dip else "") + " - "
                     + ("a bell curve as CART's Fig. 1" if bell and not dip else
                        "a peak at intermediate rank as CART's Fig. 1, but the low ranks fall BELOW the weight average "
                        "(CART's Fig. 1 rises from rank 0)" if bell else "NO bell curve, unlike CART's Fig. 1") + ".")
    rev = sw["CART, reverse"]
    if len(rev) > 2:
        lo = min(rev[1:-1])
        at_lo = ratios[1 + rev[1:-1].index(lo)]
        inv = lo < rev[0] - 0.01
        notes.append(f"{K}: reverse order (the smallest singular triplets) by rank: "
                     f"{', '.join(fmt_pct(x) for x in rev)}; lowest {fmt_pct(lo)} at {100 * at_lo:g} % - "
                     + ("an inverted bell as CART's Fig. 2 (low singular vectors carry noise)." if inv else
                        "flat: the smallest singular triplets neither help nor hurt here (CART's Fig. 2: they hurt)."))
    tal = sw["TA low-rank, top"]
    mono = all(b >= a - 0.01 for a, b in zip(tal, tal[1:]))
    notes.append(f"{K}: low-rank task arithmetic (uncentred) by rank: {', '.join(fmt_pct(x) for x in tal)} - "
                 f"{'rises (nearly) monotonically as' if mono else 'does NOT rise monotonically, unlike'} CART's Fig. 1 "
                 "(blue line).")
    mt = rows["M-TIES (k=0.8, e=0.1)"]
    if mt[0] is None:
        notes.append(f"{K}: M-TIES row {mt[1]}.")
    else:
        notes.append(f"{K}: M-TIES {fmt_pct(m['M-TIES (k=0.8, e=0.1)'])} vs TIES at the same density "
                     f"{fmt_pct(m['TIES (k=0.8)'])} - "
                     f"{verdict(m['M-TIES (k=0.8, e=0.1)'], m['TIES (k=0.8)'], 'M-Loss: row trimming by M-Loss helps TIES')}.")
    ens = m["feature ensemble of the fine-tunes"]
    best = max((v, k) for k, v in m.items() if k not in ("individual fine-tunes", "multi-task model (upper bound)",
                                                          "feature ensemble of the fine-tunes") and v == v)
    notes.append(f"{K}: the ensemble of the fine-tunes reaches {fmt_pct(ens)} (8 forward passes), the best merge "
                 f"{fmt_pct(best[0])} ({best[1]}), the multi-task model {fmt_pct(m['multi-task model (upper bound)'])}.")
    return notes
