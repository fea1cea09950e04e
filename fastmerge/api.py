"""The Python API: merge checkpoints on disk, or tensors / state dicts in memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ._lazy import torch

from . import backends
from .backends.base import MergeJob
from .config import MergeConfig, load_config
from .errors import ConfigError
from .methods import get_method
from .methods.base import REQUIRED, ParamContext, coerce
from .plan import MergePlan, build_plan, make_options

if TYPE_CHECKING:
    from .engine.session import MergeReport
    from .engine.sweep import SweepReport


def plan(config: MergeConfig | Mapping[str, Any] | str | Path, out_dir: str | Path | None = None, **options: Any) -> MergePlan:
    """Build the merge plan (headers only, nothing merged): see ``fastmerge.plan.build_plan``."""
    return build_plan(load_config(config), make_options(**options), out_dir)


def merge(config: MergeConfig | Mapping[str, Any] | str | Path, out_dir: str | Path, **options: Any) -> "MergeReport | SweepReport":
    """Merge the checkpoints described by ``config`` (a YAML path, a dict in mergekit's schema, or a
    MergeConfig) into ``out_dir``. Options: device, backend, out_shard_size, threads, seed, overwrite,
    mergekit_compat, copy_tokenizer, progress, max_gpu_memory, resume. The plan is built and checked first
    (headers only); then the first engine that can run it (``fastmerge.engine.select``) writes the output.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this call and writes its share of the shards;
    ``resume=True`` keeps the shards an interrupted merge of the same plan completed
    (``fastmerge.engine.distributed``)."""
    from . import engine

    opts = make_options(**options)

    built: list[MergePlan] = []

    def build() -> MergePlan:
        cfg = load_config(config)
        # a rank sweep writes one model per ratio into OUT/rank-<ratio>/: the sweep engine checks those
        built.append(build_plan(cfg, opts, None if cfg.rank_sweep else out_dir))
        return built[-1]

    from .engine.signals import terminate_as_interrupt

    with terminate_as_interrupt():  # SIGTERM / SIGHUP unwind like Ctrl-C: the session cleans up
        report = engine.merge(build, out_dir, opts)
    if built and hasattr(report, "shards") and hasattr(report, "out_dtype"):  # the summary names them
        report.out_dtype = "/".join(sorted(set(built[-1].columns.out_dtype)))
        report.shards = len(built[-1].shards)
    return report


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    mergekit_compat: bool = False,
    out_dtype: torch.dtype | None = None,
    threads: int = 0,
    seed: int = 0,
    tensor_name: str = "",
    **params: Any,
) -> torch.Tensor:
    """Merge same-shape CPU tensors with ``method``. Per-model parameters (``weight``, ``density``) take
    a list (one value per tensor) or a scalar for all; shared ones (``normalize``, ``lambda``...) a scalar.
    Returns a new tensor in ``out_dtype`` (default: the base's dtype, else the first tensor's).
    Random methods draw from (``seed``, hash of ``tensor_name``, element index): the same on every backend."""
    m = get_method(method)
    if not tensors:
        raise ConfigError("merge_tensors: no tensors given")
    if m.base_policy == "required" and base is None:
        raise ConfigError(f"merge_tensors: method '{m.name}' needs base=")
    if len(tensors) < m.min_models or (m.max_models is not None and len(tensors) > m.max_models):
        words = {1: "one", 2: "two"}
        want = (f"exactly {words.get(m.min_models, m.min_models)}" if m.max_models == m.min_models
                else f"at least {m.min_models}" if m.max_models is None else f"{m.min_models} to {m.max_models}")
        raise ConfigError(f"merge_tensors: method '{m.name}' takes {want} tensor(s) besides the base, got {len(tensors)}")
    shape = tuple(tensors[0].shape)
    for i, t in enumerate(tensors):
        if tuple(t.shape) != shape:
            raise ConfigError(f"merge_tensors: tensors[{i}] has shape {list(t.shape)}, tensors[0] {list(shape)}")
    if base is not None and tuple(base.shape) != shape:
        raise ConfigError(f"merge_tensors: base has shape {list(base.shape)}, tensors {list(shape)}")
    for i, t in enumerate([*tensors, *([] if base is None else [base])]):
        if not t.is_floating_point():
            which = "base" if i == len(tensors) else f"tensors[{i}]"
            raise ConfigError(f"merge_tensors{f' {tensor_name!r}' if tensor_name else ''}: {which} is {t.dtype}; only "
                              "floating-point tensors are merged")
    specs = m.param_specs()
    for k in params:
        if k not in specs:
            raise ConfigError(f"merge_tensors: method '{m.name}' has no parameter '{k}' (has: {', '.join(specs)})")
    per_model: dict[str, list[Any]] = {}
    shared: dict[str, Any] = {}
    for spec in m.params:
        v = params.get(spec.name, spec.default)
        if v is REQUIRED:
            raise ConfigError(f"merge_tensors: missing required parameter '{spec.name}'")
        if spec.per_model:
            vals = list(v) if isinstance(v, (list, tuple)) else [v] * len(tensors)
            if len(vals) != len(tensors):
                raise ConfigError(f"merge_tensors: '{spec.name}' has {len(vals)} values for {len(tensors)} tensors")
            per_model[spec.name] = [coerce(spec, x, f"merge_tensors {spec.name}") for x in vals]
        else:
            shared[spec.name] = coerce(spec, v, f"merge_tensors {spec.name}")
    p = m.make_params(per_model, shared, ParamContext(tensor_name, seed))
    m.check(p, "merge_tensors")
    job = MergeJob("<tensor>", m, p, mergekit_compat)
    device = "cpu"
    name, _ = backends.select(job, device, backend)
    dt = out_dtype or (base.dtype if base is not None else tensors[0].dtype)
    out = torch.empty(shape, dtype=dt)
    inputs = [t.detach().contiguous() for t in tensors]
    b = None if base is None else base.detach().contiguous()
    if m.base_policy == "ignored":
        b = None  # as mergekit: a base given to a method that does not use one is ignored
    backends.BACKENDS[name].run(job, out, inputs, b, threads)
    return out


def merge_state_dicts(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts key by key (keys of ``base``, else of the first state dict). Integer
    and bool tensors (BatchNorm's ``num_batches_tracked``, index buffers) are not merged: they are copied
    from ``base``, else from the first state dict, as ``research.soups.uniform_soup`` does."""
    if not state_dicts:
        raise ConfigError("merge_state_dicts: no state dicts given")
    ref = base if base is not None else state_dicts[0]
    out: dict[str, torch.Tensor] = {}
    for key in ref:
        for i, sd in enumerate(state_dicts):
            if key not in sd:
                raise ConfigError(f"merge_state_dicts: key '{key}' missing in state_dicts[{i}]")
        if not ref[key].is_floating_point():
            out[key] = ref[key].detach().clone()
            continue
        # the tensor's name keys the random methods' generator: same-shape tensors get different masks
        out[key] = merge_tensors(
            method, [sd[key] for sd in state_dicts], None if base is None else base[key], **{"tensor_name": key, **kwargs}
        )
    return out
