"""Experiment 3: the rows of a linear classifier are class templates, and merging averages templates
(Rethinking Weight-Averaged Model-merging, Fig. 1-2 analogue, https://arxiv.org/abs/2411.09263).

Linear softmax classifiers (64 pixels -> 10 classes, ``MLPConfig(hidden=())``) trained on the digits:
- the class means of the training images next to the classifier's rows (Fig. 1);
- the templates of classes c and c+5 averaged (Fig. 2: "bicycle + bottle");
- the templates of a classifier trained on the identity task, one trained on the mirrored (hflip) task,
  and their weight average (a merge of two tasks);
- for linear models, averaging weights and averaging outputs are the same function (paper Eq. 3 = Eq. 5):
  the table checks it numerically (the largest logit difference, float rounding only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..analysis import class_means, render_templates, templates
from ..ensemble import LogitEnsemble
from ..soups import uniform_soup
from .common import Timer, command, out_dir_for, single_thread
from .data import make_tasks
from .models import MLPConfig, build
from .report import fmt_pct, write_table
from .train import evaluate, predict, train_cached

NAME = "templates"
LINEAR = MLPConfig(64, (), 10)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def run(out_dir: Path, cache_dir: Optional[Path], smoke: bool) -> Path:
    """Train (or load) the linear classifiers, write ``templates.md`` and four PNG grids under ``out_dir/templates``."""
    timer = Timer()
    d = out_dir_for(out_dir, NAME)
    tasks = make_tasks(0, ("identity", "hflip"))
    ident, flip = tasks["identity"], tasks["hflip"]
    epochs = 2 if smoke else 40
    with single_thread():
        lin = [train_cached(LINEAR, ident, epochs=epochs, lr=1e-2, seed=s, cache_dir=cache_dir, weight_decay=1e-3)
               for s in (0, 1)]
        lin_flip = train_cached(LINEAR, flip, epochs=epochs, lr=1e-2, seed=0, cache_dir=cache_dir, weight_decay=1e-3)
        w = lin[0].head.weight.detach()
        means = class_means(ident.x_train, ident.y_train, 10)[:, 0]
        centred = means - means.mean(0, keepdim=True)
        tmpl = templates(w, (8, 8))
        labels = [str(c) for c in range(10)]
        render_templates(means, d / "class_means.png", labels=labels, title="class means (identity task)")
        render_templates(tmpl, d / "templates.png", labels=labels, title="linear classifier templates")
        pair = torch.stack([(tmpl[c] + tmpl[c + 5]) / 2 for c in range(5)])
        render_templates(torch.cat([tmpl[:5], tmpl[5:], pair]), d / "merged_classes.png", ncols=5,
                         labels=[str(c) for c in range(10)] + [f"{c}+{c + 5}" for c in range(5)],
                         title="templates of classes c and c+5 and their average")
        tf = templates(lin_flip.head.weight.detach(), (8, 8))
        render_templates(torch.cat([tmpl, tf, (tmpl + tf) / 2]), d / "merged_tasks.png", ncols=10,
                         labels=[f"id {c}" for c in range(10)] + [f"flip {c}" for c in range(10)]
                         + [f"avg {c}" for c in range(10)],
                         title="identity, hflip and averaged classifier templates")

        cos = [_cos(tmpl[c] - tmpl.mean(0), centred[c]) for c in range(10)]
        cos_other = [max(_cos(tmpl[c] - tmpl.mean(0), centred[o]) for o in range(10) if o != c) for c in range(10)]
        soup = linear_model(uniform_soup([m.state_dict() for m in lin]))
        ens = LogitEnsemble(lin)
        diff = float((predict(soup, ident.x_test) - predict(ens, ident.x_test)).abs().max())
        two = linear_model(uniform_soup([lin[0].state_dict(), lin_flip.state_dict()]))
        ens_two = LogitEnsemble([lin[0], lin_flip])
        diff_two = float((predict(two, ident.x_test) - predict(ens_two, ident.x_test)).abs().max())
        rows_acc = [
            ["linear classifier, seed 0", fmt_pct(evaluate(lin[0], ident)), fmt_pct(evaluate(lin[0], flip))],
            ["linear classifier, seed 1", fmt_pct(evaluate(lin[1], ident)), fmt_pct(evaluate(lin[1], flip))],
            ["uniform soup of seeds 0, 1", fmt_pct(evaluate(soup, ident)), fmt_pct(evaluate(soup, flip))],
            ["logit ensemble of seeds 0, 1", fmt_pct(evaluate(ens, ident)), fmt_pct(evaluate(ens, flip))],
            ["classifier trained on hflip", fmt_pct(evaluate(lin_flip, ident)), fmt_pct(evaluate(lin_flip, flip))],
            ["soup of identity + hflip classifiers", fmt_pct(evaluate(two, ident)), fmt_pct(evaluate(two, flip))],
            ["logit ensemble of identity + hflip", fmt_pct(evaluate(ens_two, ident)), fmt_pct(evaluate(ens_two, flip))],
        ]
    rows_cos = [[c, f"{cos[c]:.3f}", f"{cos_other[c]:.3f}"] for c in range(10)]
    rows_cos.append(["mean", f"{sum(cos) / 10:.3f}", f"{sum(cos_other) / 10:.3f}"])
    own_best = sum(cos[c] > cos_other[c] for c in range(10))
    notes = [
        f"Each template correlates with its own class mean more than with any other class mean for {own_best} of 10 "
        f"classes (cosine {sum(cos) / 10:.3f} on average, vs {sum(cos_other) / 10:.3f} for the best other class): "
        f"{'agrees' if own_best >= 8 else 'only partly agrees'} with the paper's Fig. 1 (templates look like class averages).",
        f"Soup vs logit ensemble of two linear classifiers: largest logit difference {diff:.2e} (seeds) and {diff_two:.2e} "
        "(identity + hflip) - float rounding only: for linear models averaging weights is averaging outputs "
        "(paper Eq. 3 = Eq. 5), so merging can only lose to ensembling through non-linearities.",
        "The averaged templates (merged_classes.png, merged_tasks.png) superimpose both patterns at half contrast: "
        "the paper's 'Mixup in weight space' (Fig. 2) and its remark that merged templates fade.",
    ]
    return write_table(
        d / "templates.md", "Weight templates (paper Fig. 1-2 analogue)",
        [("Accuracy (test split, %)", ["model", "identity task", "hflip task"], rows_acc),
         ("Template vs class mean (cosine, both centred over classes)", ["class", "own class mean", "best other class"],
          rows_cos)],
        notes, images=["class_means.png", "templates.png", "merged_classes.png", "merged_tasks.png"],
        command=command(NAME, smoke), seconds=timer(), smoke=smoke,
    )


def linear_model(sd: dict) -> torch.nn.Module:
    """A linear classifier holding ``sd``."""
    m = build(LINEAR, 0)
    m.load_state_dict(sd)
    return m.eval()
