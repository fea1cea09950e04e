"""M-Loss on torch modules: capture each target layer's shared input with hooks, reduce every source's
pre-activations on it.

A *target* is a linear layer whose output feeds an activation (``Target("mlp.c_fc", "gelu_tanh")``), or
a gated pair (``Target("mlp.gate_proj", "silu", up="mlp.up_proj")``: σ(gate)·up, LLaMA). Node j of the
target is row j of its weight (and of ``up``'s): the parameters linearly correlated with it (Def. 3.2).

Where the shared input x of a target comes from (``mode``):

- ``"base"``: the pretrained model's own input to that layer (one forward pass of the base model per
  batch captures every target). This is what the official code does (``LLFCAnalyzer``: a hook on the
  zero-shot model, never updated while merging).
- ``"progressive"``: the paper's Algorithm 1 / Section 6.3: a working copy of the base starts unmerged;
  targets are visited in execution order, and before each one every module that runs before it is
  merged (``merge_fn``; default the α-weighted parameter average, the "merging" M-Loss compares with
  ensembling), so x comes from the model merged so far. The forward pass is cut right after x is
  captured. The target itself is merged once its M-Loss is known (M-TIES uses that loss).

Each source's pre-activations h_a = W_a·x + b_a are then reduced by ``fastmerge.mloss.compute_mloss``
(fused Triton kernel on CUDA, chunked torch on CPU); batches add up (``MLoss`` holds sums).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError
from .reference import DEFAULT_EPS, MLoss, activation as parse_activation


@dataclasses.dataclass(frozen=True)
class Target:
    """A linear module (by name) feeding ``activation``; gated: ``up`` names the up projection."""

    linear: str
    activation: str = "gelu"
    up: str | None = None

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.linear,) if self.up is None else (self.linear, self.up)


#: (parameter name, the sources' tensors, the base's tensor or None, node loss of its rows or None) → merged
MergeFn = Callable[[str, Sequence[torch.Tensor], "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


class _Stop(Exception):
    """Raised by a capture hook to cut a forward pass once the wanted input is in hand."""


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _act_of(module: torch.nn.Module) -> str | None:
    nn = torch.nn
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.LeakyReLU):
        return f"leaky_relu({module.negative_slope})"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.SiLU):
        return "silu"
    if type(module).__name__.lower() == "quickgelu":  # open_clip / CLIP
        return "quick_gelu"
    return None


def _leaf_order(model: torch.nn.Module, batch: Any) -> list[str]:
    """Names of the leaf modules in the order one forward pass first calls them."""
    order: list[str] = []
    seen: set[str] = set()
    handles = []
    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()):
            def hook(_m, _inp, name=name):
                if name not in seen:
                    seen.add(name)
                    order.append(name)
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


def find_targets(model: torch.nn.Module, example_batch: Any) -> list[Target]:
    """Every ``nn.Linear`` whose next called leaf module (in one forward pass) is an activation module
    (ReLU, LeakyReLU, GELU, SiLU, QuickGELU). Activations applied functionally (``F.gelu``) or gated
    MLPs are not found this way: list those ``Target``s yourself."""
    order = _leaf_order(model, example_batch)
    mods = dict(model.named_modules())
    out = []
    for a, b in zip(order, order[1:]):
        act = _act_of(mods[b])
        if isinstance(mods[a], torch.nn.Linear) and act is not None:
            out.append(Target(a, act))
    return out


def capture_inputs(model: torch.nn.Module, names: Sequence[str], batch: Any, stop_after: str | None = None) -> dict[str, torch.Tensor]:
    """The input of each module in ``names`` during one forward pass on ``batch``, flattened to [rows, d_in]
    (first call of each). ``stop_after``: cut the pass once that module's input is captured."""
    mods = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        if n not in mods:
            raise ConfigError(f"M-Loss: the model has no module '{n}'")

        def hook(_m, inp, n=n):
            if n not in out:
                x = inp[0].detach()
                out[n] = x.reshape(-1, x.shape[-1])
            if stop_after is not None and all(k in out for k in names) and n == stop_after:
                raise _Stop
        handles.append(mods[n].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in out]
    if missing:
        raise ConfigError(f"M-Loss: module '{missing[0]}' was not called by the forward pass")
    return out


def _stack(models: Sequence[torch.nn.Module], name: str, attr: str) -> torch.Tensor | None:
    ts = [getattr(dict(m.named_modules())[name], attr) for m in models]
    if ts[0] is None:
        return None
    return torch.stack([t.detach() for t in ts])


def _target_loss(
    x: torch.Tensor, models: Sequence[torch.nn.Module], t: Target, alpha: Sequence[float] | None, eps: float,
    backend: str,
) -> MLoss:
    from . import compute_mloss

    w = _stack(models, t.linear, "weight")
    b = _stack(models, t.linear, "bias")
    uw = ub = None
    if t.up is not None:
        uw = _stack(models, t.up, "weight")
        ub = _stack(models, t.up, "bias")
        if (b is None) != (ub is None):
            raise ConfigError(f"M-Loss: '{t.linear}' and '{t.up}' must both have biases or neither")
    act = parse_activation(t.activation, gated=t.up is not None)
    return compute_mloss(x.to(w.dtype), w, b, alpha=alpha, activation=act, up_weight=uw, up_bias=ub, eps=eps,
                         backend=backend)


def average_merge(alpha: Sequence[float]) -> MergeFn:
    """The α-weighted parameter average (M-Loss' "merging"), fp32, in the base's dtype."""
    def fn(name: str, xs: Sequence[torch.Tensor], base: torch.Tensor | None, row_loss: torch.Tensor | None) -> torch.Tensor:
        out = sum(a * x.float() for a, x in zip(alpha, xs))
        return out.to(xs[0].dtype)
    return fn


@dataclasses.dataclass
class ModuleMLoss:
    """Per-target M-Loss (keyed by the target's linear name) and, when merging, the merged state dict."""

    losses: dict[str, MLoss]
    merged: dict[str, torch.Tensor] | None = None

    def node(self, name: str, statistic: str = "abs") -> torch.Tensor:
        return self.losses[name].node(statistic)

    def layer(self, name: str) -> float:
        return self.losses[name].layer


def walk(
    models: Sequence[torch.nn.Module], batches: Iterable[Any], targets: Sequence[Target] | None = None, *,
    base: torch.nn.Module | None = None, mode: str = "base", alpha: Sequence[float] | None = None,
    eps: float = DEFAULT_EPS, backend: str = "auto", merge_fn: MergeFn | None = None, statistic: str = "sq",
) -> ModuleMLoss:
    """The driver of ``module_mloss`` and ``m_ties_modules``: M-Loss of every target, and with ``merge_fn``
    the merged parameters (targets' weights get their node loss of ``statistic``; other tensors None)."""
    if mode not in ("base", "progressive"):
        raise ConfigError(f"M-Loss: mode must be 'base' or 'progressive', got {mode!r}")
    if not models:
        raise ConfigError("M-Loss: no source models")
    batches = list(batches)
    if not batches:
        raise ConfigError("M-Loss: no batches")
    q = len(models)
    al = [1.0 / q] * q if alpha is None else [float(a) for a in alpha]
    if mode == "base" and base is None:
        raise ConfigError("M-Loss: mode='base' takes the layer inputs from the pretrained model: give base=")
    if targets is None:
        targets = find_targets(base if base is not None else models[0], batches[0])
        if not targets:
            raise ConfigError("M-Loss: no Linear followed by an activation module found: give targets=[Target(...)]")
    targets = list(targets)
    names = [t.linear for t in targets]
    if len(set(names)) != len(names):
        raise ConfigError("M-Loss: a target is listed twice")
    params = [dict(m.named_parameters()) for m in models]
    base_params = dict(base.named_parameters()) if base is not None else None
    for i, p in enumerate(params[1:], 1):
        if p.keys() != params[0].keys():
            raise ConfigError(f"M-Loss: models[{i}] has different parameters from models[0]")
    owner = {t.linear + ".weight": t.linear for t in targets}
    owner.update({t.up + ".weight": t.linear for t in targets if t.up is not None})
    losses: dict[str, MLoss] = {}
    merged: dict[str, torch.Tensor] = {}
    fn = merge_fn or average_merge(al)

    def merge_param(pname: str) -> torch.Tensor:
        row = None
        if pname in owner and owner[pname] in losses:
            row = losses[owner[pname]].node(statistic)
        b = None if base_params is None else base_params[pname].detach()
        merged[pname] = fn(pname, [p[pname].detach() for p in params], b, row)
        return merged[pname]

    if mode == "base":
        for batch in batches:
            xs = capture_inputs(base, names, batch)
            for t in targets:
                part = _target_loss(xs[t.linear], models, t, al, eps, backend)
                losses[t.linear] = part if t.linear not in losses else losses[t.linear] + part
        if merge_fn is not None:
            for pname in params[0]:
                merge_param(pname)
        return ModuleMLoss(losses, merged if merge_fn is not None else None)

    # progressive: a working copy, merged module by module in execution order
    work = copy.deepcopy(base if base is not None else models[0])
    wparams = dict(work.named_parameters())
    order = _leaf_order(work, batches[0])
    pos = {n: i for i, n in enumerate(order)}
    for t in targets:
        for n in t.modules:
            if n not in pos:
                raise ConfigError(f"M-Loss: target module '{n}' is not called by the forward pass")
    owner_mod: dict[str, str] = {}  # parameter -> leaf module that owns it ("" for non-leaf owners)
    leaf_names = set(order)
    for pname in params[0]:
        mod = pname.rsplit(".", 1)[0] if "." in pname else ""
        owner_mod[pname] = mod if mod in leaf_names else ""
    target_mods = {n for t in targets for n in t.modules}
    done: set[str] = set()

    def commit(pname: str) -> None:
        if pname in done:
            return
        v = merge_param(pname)
        with torch.no_grad():
            wparams[pname].copy_(v.to(wparams[pname].dtype))
        done.add(pname)

    # parameters of non-leaf modules (ViT's class / positional embeddings) are used first: merged up front
    for pname, mod in owner_mod.items():
        if mod == "":
            commit(pname)
    for t in sorted(targets, key=lambda t: min(pos[n] for n in t.modules)):
        first = min(pos[n] for n in t.modules)
        for pname, mod in owner_mod.items():
            if mod and mod not in target_mods and pos[mod] < first:
                commit(pname)
        stop = min(t.modules, key=lambda n: pos[n])
        for batch in batches:
            x = capture_inputs(work, [stop], batch, stop_after=stop)[stop]
            part = _target_loss(x, models, t, al, eps, backend)
            losses[t.linear] = part if t.linear not in losses else losses[t.linear] + part
        for pname, mod in owner_mod.items():
            if mod in t.modules:
                commit(pname)
    for pname in params[0]:
        commit(pname)
    return ModuleMLoss(losses, merged if merge_fn is not None else None)


def module_mloss(
    models: Sequence[torch.nn.Module], batches: Iterable[Any], targets: Sequence[Target] | None = None, *,
    base: torch.nn.Module | None = None, mode: str = "base", alpha: Sequence[float] | None = None,
    eps: float = DEFAULT_EPS, backend: str = "auto",
) -> ModuleMLoss:
    """Per-target (layer-level and per-node) M-Loss of source ``models`` (same architecture) on unlabeled
    ``batches`` (a tensor, a tuple of positional arguments or a dict of keyword arguments each).

    ``targets``: default ``find_targets`` on the first batch. ``mode``: "base" (inputs from ``base``, the
    pretrained model: the official code) or "progressive" (from a copy of ``base``, or of models[0],
    merged by α-weighted averaging up to each target: the paper). ``alpha`` default uniform."""
    return walk(models, batches, targets, base=base, mode=mode, alpha=alpha, eps=eps, backend=backend)
