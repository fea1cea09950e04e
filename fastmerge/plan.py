"""``build_plan``: from a config and the input headers to a pure, JSON-serialisable merge plan.

No tensor byte is read. Everything that can be wrong with the inputs is found here, before any heavy
work: missing models or tensors, shape mismatches, unsupported dtypes, parameter values (density,
zero weight sums), the output location. Each output tensor gets its sources, resolved parameters
(gradients over layers and ``filter`` lists evaluated), output dtype, output shard, and the backend
chosen with the reasons the others were skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from . import backends
from .backends.base import MergeJob
from .config import MergeConfig, evaluate_setting
from .errors import CheckpointError, ConfigError, OutputError, ShapeMismatchError
from .io.index import CheckpointIndex, TensorInfo
from .io.writer import DEFAULT_SHARD_BYTES, OutTensor, Shard, plan_shards
from .methods import MergeMethod
from .methods.base import REQUIRED, ParamContext

#: Layer index in common naming schemes: LLaMA/Mistral/Qwen/Gemma "model.layers.3.", GPT-2 "h.3.",
#: BERT/T5 "layer.3." / "block.3.", ViT "blocks.3.", NeoX "gpt_neox.layers.3.".
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class Options:
    """Run options (CLI flags / ``fastmerge.merge`` keyword arguments)."""

    device: str = "cpu"  # "auto" | "cpu" | "cuda"
    backend: str = "auto"
    out_shard_size: int = DEFAULT_SHARD_BYTES
    threads: int = 0  # 0: all cores
    seed: int | None = None
    overwrite: bool = False
    mergekit_compat: bool = False
    copy_tokenizer: bool = True
    progress: bool = True


@dataclasses.dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    compute_dtype: str | None  # compat mode only: inputs cast to this dtype first
    base: TensorInfo | None
    sources: list[TensorInfo]  # one per non-base model, config order
    params: Any
    layer: int | None
    backend: str
    skipped: dict[str, list[str]]

    @property
    def in_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources) + (self.base.nbytes if self.base else 0)

    @property
    def out_tensor(self) -> OutTensor:
        return OutTensor(self.name, self.out_dtype, self.shape)


@dataclasses.dataclass
class MergePlan:
    config: MergeConfig
    options: Options
    device: str
    base_index: CheckpointIndex | None
    indexes: list[CheckpointIndex]  # non-base models, config order
    tensors: list[TensorPlan]
    shards: list[Shard]

    @property
    def method(self) -> MergeMethod:
        return self.config.method

    @property
    def in_bytes(self) -> int:
        return sum(t.in_bytes for t in self.tensors)

    @property
    def out_bytes(self) -> int:
        return sum(t.out_tensor.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        shard_of = {t.name: s.filename for s in self.shards for t in s.tensors}
        opts = dataclasses.asdict(self.options)
        return {
            "config": self.config.to_dict(),
            "options": opts,
            "device": self.device,
            "input_bytes": self.in_bytes,
            "output_bytes": self.out_bytes,
            "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": sum(t.nbytes for t in s.tensors)} for s in self.shards],
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "out_dtype": t.out_dtype,
                    "compute_dtype": t.compute_dtype,
                    "layer": t.layer,
                    "base": None if t.base is None else {"file": str(t.base.file), "dtype": t.base.dtype},
                    "sources": [{"file": str(s.file), "dtype": s.dtype} for s in t.sources],
                    "params": {k.rstrip("_"): (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(t.params).items()},
                    "shard": shard_of[t.name],
                    "backend": t.backend,
                    "skipped": t.skipped,
                }
                for t in self.tensors
            ],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def _num_layers(index: CheckpointIndex) -> int:
    cfg = index.root / "config.json"
    if cfg.is_file():
        try:
            n = json.loads(cfg.read_text()).get("num_hidden_layers")
            if isinstance(n, int) and n > 0:
                return n
        except (OSError, json.JSONDecodeError):
            pass
    idx = [i for i in (layer_index(n) for n in index.tensors) if i is not None]
    return max(idx) + 1 if idx else 0


def _resolve(method: MergeMethod, cfg: MergeConfig, name: str, t: float, seed: int) -> Any:
    per_model: dict[str, list[Any]] = {}
    shared: dict[str, Any] = {}
    from .methods.base import coerce

    for spec in method.params:
        if spec.per_model:
            vals = []
            for i, m in enumerate(cfg.models):
                v = None
                for src in (m.parameters, cfg.parameters):
                    if spec.name in src:
                        v = evaluate_setting(src[spec.name], name, t)
                        if v is not None:
                            break
                if v is None:
                    if spec.default is REQUIRED:
                        raise ConfigError(f"models[{i}] ({m.path}): no value of '{spec.name}' applies to tensor '{name}' (add a fallback {{value: ...}})")
                    v = spec.default
                vals.append(coerce(spec, v, f"models[{i}] ({m.path}), tensor '{name}'"))
            per_model[spec.name] = vals
        else:
            v = evaluate_setting(cfg.parameters[spec.name], name, t) if spec.name in cfg.parameters else None
            shared[spec.name] = coerce(spec, spec.default if v is None else v, f"parameters, tensor '{name}'")
    params = method.make_params(per_model, shared, ParamContext(name, seed))
    method.check(params, f"tensor '{name}'")
    return params


def check_output(out: Path, input_roots: list[Path], overwrite: bool) -> None:
    out_r = out.resolve()
    for root in input_roots:
        r = root.resolve()
        if out_r == r or r in out_r.parents or out_r in r.parents:
            raise OutputError(f"{out}: output overlaps input model folder {root} (inputs are never written)")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: output exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")


def build_plan(config: MergeConfig, options: Options | None = None, out: str | Path | None = None) -> MergePlan:
    """Open every input's headers, resolve every tensor's parameters and backend, lay out the output."""
    options = options or Options()
    method = config.method
    device = backends.resolve_device(options.device)
    base_index = CheckpointIndex.open(config.base_model) if config.base_model and method.base_policy != "ignored" else None
    indexes = [CheckpointIndex.open(m.path) for m in config.models]
    if out is not None:
        roots = [ix.root for ix in indexes] + ([base_index.root] if base_index else [])
        if config.base_model:
            roots.append(Path(config.base_model) if Path(config.base_model).is_dir() else Path(config.base_model).parent)
        check_output(Path(out), roots, options.overwrite)
    ref = base_index or indexes[0]
    n_layers = _num_layers(ref)
    plans: list[TensorPlan] = []
    for name, info in ref.tensors.items():
        sources: list[TensorInfo] = []
        for m, ix in zip(config.models, indexes):
            s = ix.tensors.get(name)
            if s is None:
                raise CheckpointError(f"{m.path}: tensor '{name}' is missing (present in {ref.root})")
            if s.shape != info.shape:
                raise ShapeMismatchError(f"tensor '{name}': shape {list(s.shape)} in {m.path} but {list(info.shape)} in {ref.root}")
            sources.append(s)
        layer = layer_index(name)
        t = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
        params = _resolve(method, config, name, t, options.seed or 0)
        first = base_index.tensors[name] if base_index else sources[0]
        out_dtype = config.out_dtype or config.dtype or first.dtype
        job = MergeJob(name, method, params, options.mergekit_compat)
        backend, skipped = backends.select(job, device, options.backend)
        plans.append(
            TensorPlan(
                name=name, shape=info.shape, out_dtype=out_dtype,
                compute_dtype=(config.dtype or first.dtype) if options.mergekit_compat else None,
                base=base_index.tensors[name] if base_index else None, sources=sources, params=params,
                layer=layer, backend=backend, skipped=skipped,
            )
        )
    for m, ix in zip(config.models, indexes):
        extra = [n for n in ix.tensors if n not in ref.tensors]
        if extra:
            raise CheckpointError(f"{m.path}: tensor '{extra[0]}' is not in {ref.root} (models must share tensor names)")
    shards = plan_shards([p.out_tensor for p in plans], options.out_shard_size)
    return MergePlan(config, options, device, base_index, indexes, plans, shards)
