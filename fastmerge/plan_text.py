"""``fastmerge plan`` as text: the plan compactly, parameters and slice sources included.

What is the same for every tensor is said once (parameters, the reasons a backend was skipped); each
tensor line adds only what differs: its varying parameters, and for slices the model and layer each
input comes from (``m1:3`` = layer 3 of model m1, named in the legend)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .plan import layer_index

#: Params fields that are not parameters (the generator key is derived from the tensor name)
_INTERNAL = {"seed", "key", "tensor"}


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _params(tp: Any) -> dict[str, str]:
    try:
        d = dataclasses.asdict(tp.params)
    except TypeError:
        return {}
    return {k.rstrip("_"): _fmt(v) for k, v in d.items() if k not in _INTERNAL}


def render(plan: Any, engine: str, skipped_engines: dict[str, list[str]], explain: bool) -> tuple[list[str], list[str]]:
    """(the summary lines, the per-tensor lines with what they share said first)."""
    head = [f"{plan.method.name}: {len(plan.tensors)} tensors, {plan.in_bytes / 1e6:.1f} MB in, "
             f"{plan.out_bytes / 1e6:.1f} MB out, {len(plan.shards)} shard(s), device {plan.device}, engine {engine}"]
    if explain:
        head += [f"  engine {name} skipped: {'; '.join(why)}" for name, why in skipped_engines.items()]
    lines: list[str] = []
    # models, numbered in config order (the legend of the slice sources)
    model_of: dict[Any, str] = {}
    labels: dict[str, str] = {}
    for k, (path, ix) in enumerate(plan.indexes.items()):
        labels[path] = f"m{k}"
        for f in ix.files:
            model_of.setdefault(f, path)
    sliced = plan.out_layers is not None
    if sliced:
        lines.append("  models: " + ", ".join(f"{labels[p]} = {p}" for p in plan.indexes))
    # by Params object: the plan shares one among the tensors of equal parameters (45k tensors of DeepSeek-V3:
    # dataclasses.asdict for each took ~0.3 ms, most of `fastmerge plan`'s time)
    memo: dict[int, dict[str, str]] = {}
    per = [memo[id(t.params)] if id(t.params) in memo else memo.setdefault(id(t.params), _params(t)) for t in plan.tensors]
    common = {k: v for k, v in (per[0].items() if per else []) if all(p.get(k) == v for p in per)}
    if common:
        lines.append("  parameters (every tensor): " + " ".join(f"{k}={v}" for k, v in common.items()))
    # reasons a backend was skipped: those shared by every tensor said once
    shared_why: dict[str, list[str]] = {}
    if explain and plan.tensors:
        for b, why in plan.tensors[0].skipped.items():
            same = [w for w in why if all(w in t.skipped.get(b, []) for t in plan.tensors)]
            if same:
                shared_why[b] = same
        if shared_why:
            lines.append("  backends skipped for every tensor: "
                         + "; ".join(f"{b}: {', '.join(w)}" for b, w in shared_why.items()))
    for t, p in zip(plan.tensors, per):
        line = f"  {t.name} {list(t.shape)} {t.out_dtype} -> {t.backend}"
        varying = " ".join(f"{k}={v}" for k, v in p.items() if k not in common)
        if varying:
            line += f"  {varying}"
        if sliced:
            infos = ([t.base] if t.base is not None else []) + list(t.sources)
            src = []
            for x in infos:
                lab = labels.get(model_of.get(x.file), "?")
                li = layer_index(x.name)
                src.append(lab if li is None else f"{lab}:{li}")
            line += "  <- " + " ".join(src)
        if explain:
            rest = {b: [w for w in why if w not in shared_why.get(b, [])] for b, why in t.skipped.items()}
            rest = {b: w for b, w in rest.items() if w}
            if rest:
                line += "  (not " + "; ".join(f"{b}: {', '.join(w)}" for b, w in rest.items()) + ")"
        lines.append(line)
    return head, lines
