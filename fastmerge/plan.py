"""``build_plan``: from a config and the input headers to a pure, JSON-serialisable merge plan.

No tensor byte is read. Everything that can be wrong with the inputs is found here, before any heavy
work: missing models or tensors, shape mismatches, unsupported dtypes, parameter values (density,
zero weight sums), the output location. Each output tensor gets its sources, resolved parameters
(gradients over layers and ``filter`` lists evaluated), output dtype, output shard, and the backend
chosen with the reasons the others were skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
import re
from array import array
from pathlib import Path
from typing import Any

from . import backends
from ._memo import gc_paused, instances, mapped_by_identity, memo, transposed
from .backends.base import MergeJob
from .config import MergeConfig, ModuleSpec, evaluate_setting
from .errors import CheckpointError, ConfigError, OutputError, ShapeMismatchError
from .io.arch import MODULES, ModuleLayout, check_architectures, config_doc, modular_architecture, module_layouts, module_of
from .io.fp8 import Fp8Index, fp8_transform, is_fp8, output_quant_config, requant_for
from .io.index import CheckpointIndex, TensorInfo, index_in_own_order, layer_indices
from .io.lora import LoraAdapter, lora_transform, split_ref
from .io.writer import DEFAULT_SHARD_BYTES, OutTensor, Shard, parse_size, plan_shards
from .methods import MergeMethod
from .methods.base import REQUIRED, ParamContext

#: ``layer_index`` / ``LAYER_RE`` live in io.index (side files need them below the plan); the plan's names
from .io.index import LAYER_RE, layer_index  # noqa: F401


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
    max_gpu_memory: int | None = None  # --device cuda: bytes of GPU memory the engine may hold (None: fit the largest group)
    allow_crimes: bool = False  # --allow-crimes: merge models of different architectures (as mergekit's flag)
    write_model_card: bool = False  # --write-model-card: mergekit's model card as OUT/README.md
    resume: bool = False  # --resume: keep the shards an interrupted merge of the same plan completed (engine.distributed)


def make_options(**options: Any) -> Options:
    """Options from keyword arguments (``fastmerge.merge``'s), sizes parsed ("5B", "500M"); an unknown
    name is one ConfigError line."""
    names = {f.name for f in dataclasses.fields(Options)}
    bad = set(options) - names
    if bad:
        raise ConfigError(f"unknown option '{sorted(bad)[0]}' (options: {', '.join(sorted(names))})")
    if "out_shard_size" in options:
        options = {**options, "out_shard_size": parse_size(options["out_shard_size"])}
    if options.get("max_gpu_memory") is not None:
        options = {**options, "max_gpu_memory": parse_size(options["max_gpu_memory"], "--max-gpu-memory")}
    return Options(**options)


class _Memos:
    """A base with a ``__dict__`` (made at the first write) for a slotted subclass's ``memo`` values, and a slot for
    its output tensor (``TensorPlan.out_tensor``: every row of a plan gets one as it is built, and a ``__dict__``
    per row for it was 20k-45k more objects of a MoE plan)."""

    __slots__ = ("_out", "__dict__")


# Fields in slots (a MoE plan makes 20k-45k rows; a row's 12 fields written into a fresh __dict__ each were most
# of its ~0.6 us), the memos in the __dict__ the base gives. Rows of a whole-model merge come from columns
# (``_lean_rest``, ``instances``).
@dataclasses.dataclass(slots=True)
class TensorPlan(_Memos):
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
    #: what the engine does to the inputs before the method: tokenizer_source's rows of a vocabulary tensor in
    #: the output vocabulary (a ``fastmerge.vocab.RowMap``), or MODEL+ADAPTER inputs' LoRA updates (an
    #: ``io.lora.LoraTransform``, holding the row map if both apply); None otherwise
    input_transform: Any = None
    #: ``out_dtype: float8_e4m3fn``: how this tensor is re-quantised (an ``io.fp8.Requant``: its scale tensor
    #: is written right after it), None: written in ``out_dtype``
    out_quant: Any = None

    # cached (in the instance's __dict__, not fields): the engines, the shard weights and the report each ask,
    # 20k-45k tensors of a MoE model several times over
    @memo
    def in_bytes(self) -> int:
        n = 0 if self.base is None else self.base.end - self.base.begin  # TensorInfo.nbytes, inline: 60k-135k calls
        for s in self.sources:
            n += s.end - s.begin
        return n

    @property
    def out_tensor(self) -> OutTensor:
        """The output tensor (name, out_dtype, shape), made once: ``build_plan`` sets every row's from a column."""
        try:
            return self._out
        except AttributeError:
            out = self._out = OutTensor(self.name, self.out_dtype, self.shape)
            return out


class PlanColumns:
    """A plan's tensors column by column: ``columns.out_dtype`` is ``[t.out_dtype for t in tensors]`` (any TensorPlan
    attribute, its memos too), taken once with ``map`` and ``attrgetter`` (the loop in C: ~1 ms a column of a MoE
    model's 20k tensors) and then read by each step that asks: the engine's choice and its runs, the digest, the
    report, which each took the same columns again (~25 ms of a 20k-tensor merge). ``build_plan`` hands over the
    columns its whole-model path made the rows from. The columns are of the list ``tensors``: a plan's tensor list
    is not changed in place once built (``MergePlan.columns`` follows a list replaced; ``dataclasses.replace``
    makes another plan)."""

    #: ``one``'s answer for a column not known to hold one value
    VARIES: Any = type("Varies", (), {"__repr__": lambda self: "VARIES", "__slots__": ()})()

    def __init__(self, tensors: list[TensorPlan], made: dict[str, list[Any]] | None = None, one: dict[str, Any] | None = None):
        self.tensors = tensors
        if made:
            vars(self).update(made)
        self._one = one or {}

    def one(self, name: str) -> Any:
        """The value every row of column ``name`` holds, where the plan's builder knows it (``_lean_rest``: a whole-model
        merge's one Params, no transform, ...), else ``VARIES`` (nothing is computed: a caller then reads the column).
        The steps that ask whether a column holds one value (the engine's choice and runs, the digest) then skip a pass
        over 20k-45k rows."""
        return self._one.get(name, self.VARIES)

    @memo
    def out_nbytes(self) -> list[int]:
        """Each output tensor's bytes."""
        return list(map(operator.attrgetter("nbytes"), self.out_tensor))

    @memo
    def in_dtype(self) -> list[str]:
        """Each tensor's first source's dtype (the base's where it has no sources)."""
        return [(s[0] if s else b).dtype for b, s in zip(self.base, self.sources)]

    def __getattr__(self, name: str) -> list[Any]:  # a column not taken yet (a column taken is an attribute)
        if name.startswith("__"):
            raise AttributeError(name)
        col = list(map(operator.attrgetter(name), self.tensors))
        setattr(self, name, col)
        return col

    @memo
    def inputs(self) -> list[list[TensorInfo]] | None:
        """Each model's input of every tensor, as a column (the base's first where every tensor has one), or None
        where the tensors differ in their number of inputs (or only some have a base)."""
        bases, srcs = self.base, self.sources
        n_src = set(map(len, srcs))
        has_base = bases.count(None) == 0
        if len(n_src) > 1 or not (has_base or bases.count(None) == len(bases)):
            return None
        return ([bases] if has_base else []) + [list(map(operator.itemgetter(k), srcs)) for k in range(n_src.pop() if n_src else 0)]


@dataclasses.dataclass
class MergePlan:
    config: MergeConfig
    options: Options
    device: str
    indexes: dict[str, CheckpointIndex]  # every input model (base included), by config path
    ref_root: Path  # the model whose config.json / tokenizer the output inherits
    out_layers: int | None  # number of output layers when built from slices (config.json is updated)
    tensors: list[TensorPlan]
    shards: list[Shard]
    #: tokenizer_source: the output tokenizer (``fastmerge.vocab.OutputTokenizer``), else None
    tokenizer: Any = None
    #: this process's share of the output (``engine.session.Part``: the shared temp folder and manifest),
    #: set by ``engine.distributed`` on a plan ``restricted`` to some shards; None: the whole output
    part: Any = None
    #: FP8 inputs (io.fp8): {"quantization_config": the dict an FP8 output keeps, or None (removed)}; None: no FP8 input
    fp8: Any = None
    #: ``modules`` given as slices: for each config.json key counting such a module's layers (dotted into
    #: nested configs, e.g. ``text_config.num_hidden_layers``), the input layer each output layer is made
    #: from (its slice's reference model's numbering); None otherwise
    module_layers: dict[str, list[int]] | None = None

    @property
    def method(self) -> MergeMethod:
        return self.config.method

    @property
    def columns(self) -> PlanColumns:
        """``tensors`` column by column (``PlanColumns``), taken once per tensor list."""
        got = self.__dict__.get("_columns")
        if got is None or got.tensors is not self.tensors:
            got = self.__dict__["_columns"] = PlanColumns(self.tensors)
        return got

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
                    **(_transform_json(t.input_transform) if t.input_transform is not None else {}),
                    **({"out_scale": t.out_quant.scale_name} if t.out_quant is not None else {}),
                }
                for t in self.tensors
            ],
            **({"tokenizer": {"source": str(self.tokenizer.source), "vocab_size": self.tokenizer.n_rows,
                              "tokens": self.tokenizer.n_vocab}} if self.tokenizer is not None else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @gc_paused
    def digest(self) -> str:
        """sha256 (hex) of what determines the output's bytes: every tensor's name, shape, dtypes, sources
        (model, file name, offsets, dtype, shape), parameters, backend and vocabulary remap; the shards; the
        options that change bytes (seed, mergekit_compat, out_shard_size, device); every input file's size
        and tensor table (its header); the fastmerge version. Not mtimes or absolute paths of files (they
        differ across nodes of one job); the config's model paths are in, as written. Equal digests: the
        same plan (``engine.distributed`` checks it across ranks and before a resume)."""
        import hashlib

        from ._version import __version__

        h = hashlib.sha256()

        def put(obj: Any) -> None:
            h.update(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())
            h.update(b"\n")

        o = self.options
        put({"version": __version__, "config": self.config.to_dict(), "device": self.device, "seed": o.seed,
             "compat": o.mergekit_compat, "shard_size": o.out_shard_size, "out_layers": self.out_layers})
        # A safetensors model's tensor table is its files' raw headers (their sha256 taken as they were parsed,
        # io.index): 3 x 20k rows dumped as JSON took ~0.3 s for a MoE family. Each input file gets a number
        # (by identity of its Path: every TensorInfo holds its index's Path objects; hashing a Path costs ~3 us).
        fno: dict[int, int] = {}
        fno_eq: dict[Path, int] = {}
        for key, ix in sorted(self.indexes.items()):
            put({"model": key, "fmt": ix.fmt, "files": [[f.name, f.stat().st_size if f.exists() else -1] for f in ix.files]})
            for f in ix.files:
                fno.setdefault(id(f), fno_eq.setdefault(f, len(fno_eq)))
            if ix.header_sha256 is not None and len(ix.header_sha256) == len(ix.files):
                put({"headers": ix.header_sha256, "tensors": len(ix.tensors)})
            else:
                put([[t.name, fno.get(id(t.file), fno_eq.get(t.file, -1)), t.dtype, t.shape, t.begin, t.end]
                     for t in ix.tensors.values()])

        # The tensors, hashed column by column (a row per tensor built in Python was ~15 us of a MoE family's 20k-45k;
        # a repr of each column still ~5 us): each column as the table of its distinct values and every tensor's
        # number in it. Names, shapes and output dtypes are not hashed here: the shards' headers, hashed last, hold
        # them, in plan order (3 columns of 20k: ~6 ms). An input is its file's number, and its name where that
        # differs from the output name: the file's table above holds its dtype, shape and offsets. Columns are taken
        # with map and attrgetter (the loop in C: a comprehension per column was ~1 us a tensor, ~0.06 s of a
        # 20k-tensor plan).
        ts = self.tensors

        def table(values: list[Any]) -> None:
            if values[1:] == values[:-1]:  # one value (or none): every row is number 0
                h.update(repr(values[:1]).encode())
                h.update(bytes(8 * len(values)))
            else:
                nums = {v: i for i, v in enumerate(dict.fromkeys(values))}  # numbered in order of first appearance
                h.update(repr(list(nums)).encode())
                h.update(array("q", map(nums.__getitem__, values)).tobytes())
            h.update(b"\n")

        cols = self.columns
        names = cols.name
        kinds = [cols.compute_dtype, cols.backend]  # each mostly one value
        table([tuple(k[0] for k in kinds)] * len(ts) if ts and all(k[1:] == k[:-1] for k in kinds) else list(zip(*kinds)))
        bases, srcs = cols.base, cols.sources
        if cols.inputs is not None and ts:  # every tensor as many inputs: the same table, without a len() per tensor
            table([len(srcs[0]) + 1] * len(ts))
        else:
            table(list(map(operator.add, map(len, srcs), itertools.repeat(1))))
        fno[id(None)] = -1  # no base
        files, renamed = _input_columns(names, bases, srcs, cols.inputs, fno, fno_eq, self.indexes)
        h.update(files.tobytes())
        h.update(repr(renamed).encode())
        # Tensors of equal parameters mostly share one Params object (build_plan): each object is dumped once and
        # each distinct value numbered in a table that a tensor refers to (20k dicts dumped per MoE family were
        # ~0.1 s); numbered by value, so the digest does not depend on which objects are shared
        params = cols.params
        one = cols.one("params") is not cols.VARIES  # (known as the plan was built: the ids not taken)
        ids = [] if one else list(map(id, params))
        ptable: dict[str, int] = {}
        pid: dict[int, int] = {}
        for p in (params[:1] if one or ids[1:] == ids[:-1] else dict(zip(ids, params)).values()):
            d = vars(p) if hasattr(p, "__dict__") else dataclasses.asdict(p)
            pid[id(p)] = ptable.setdefault(json.dumps(d, sort_keys=True, separators=(",", ":"), default=str), len(ptable))
        h.update("\n".join(ptable).encode())
        h.update(bytes(8 * len(params)) if len(pid) <= 1 else array("q", map(pid.__getitem__, ids)).tobytes())
        transforms = cols.input_transform
        if transforms.count(None) != len(transforms):
            names_of: dict[type, list[str]] = {}  # each transform class's fields (dataclasses.fields per tensor: ~2.4 us)
            for tr in transforms:
                if tr is not None:
                    fields = names_of.get(type(tr))
                    if fields is None:
                        fields = names_of[type(tr)] = [f.name for f in dataclasses.fields(tr)]
                    for name in fields:
                        v = getattr(tr, name)
                        for a in (v if isinstance(v, list) else [v]):
                            h.update(a.tobytes() if hasattr(a, "tobytes") else repr(a).encode())
        for s in self.shards:
            h.update(s.header_sha256().encode())  # (kept by the shard: its manifest line and the resume check ask too)
        return h.hexdigest()

    def restricted(self, filenames: Any, part: Any = None, **options: Any) -> "MergePlan":
        """This plan with only the shards named ``filenames`` (and their tensors, in plan order), carrying
        ``part``; ``options``: Options fields replaced (e.g. progress off on ranks other than 0)."""
        keep = set(filenames)
        shards = [s for s in self.shards if s.filename in keep]
        if len(shards) == len(self.shards):  # all of it (one process): the same tensor list
            tensors = self.tensors
        else:
            names = {t.name for s in shards for t in s.tensors}
            tensors = [t for t in self.tensors if t.name in names]
        sub = dataclasses.replace(self, tensors=tensors, shards=shards, part=part,
                                  options=dataclasses.replace(self.options, **options))
        if tensors is self.tensors and "_columns" in vars(self):  # the same list: the columns taken (or made) already
            vars(sub)["_columns"] = vars(self)["_columns"]
        return sub


# the columns _lean_rest and the digest take with map (the loop in C) beyond PlanColumns
_NAME, _SHAPE, _FILE, _DTYPE = (operator.attrgetter(a) for a in ("name", "shape", "file", "dtype"))
_PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(TensorPlan))
_SET_OUT = _Memos._out.__set__  # (a row's output tensor, set in C over a column with map)


def _input_columns(names: list[str], bases: list[Any], srcs: list[Any], inputs: list[list[Any]] | None, fno: dict[int, int],
                   fno_eq: dict[Path, int], indexes: dict[str, CheckpointIndex]) -> tuple[array, list[tuple[int, int, str]]]:
    """The digest's input columns: every input's file number, row by row (base first, -1 for none), and the
    (tensor, input, name) of each input whose name is not the output name. Where every tensor has the same
    number of sources and a base everywhere or nowhere (``inputs``: ``PlanColumns.inputs``), column by column in C
    (a column that is a model's own tensors in its order: from its index's file counts and names); else row by row."""
    has_base = bases.count(None) == 0
    if srcs and inputs is not None:
        cols = inputs
        ids, col_names, missing = [], [], False  # missing: a file not numbered (-2), found per column, not per element
        for c in cols:
            ix = index_in_own_order(c, indexes.values())
            if ix is not None:
                nums = [fno.get(id(f), -2) for f in ix.files]
                ids.append(list(itertools.chain.from_iterable([x] * n for x, n in zip(nums, ix.file_counts))))
                col_names.append(list(ix.tensors))  # its names are its keys
            else:
                nums = list(map(fno.get, map(id, map(_FILE, c)), itertools.repeat(-2)))
                ids.append(nums)
                col_names.append(None)
            missing = missing or -2 in nums
        if not has_base:
            ids.insert(0, [-1] * len(names))
        if all(x.count(x[0]) == len(x) for x in ids):  # each model in one file: one row, repeated
            files = array("q", [x[0] for x in ids]) * len(names)
        else:
            files = array("q", itertools.chain.from_iterable(zip(*ids)))
        if not missing:
            off = 0 if has_base else 1
            renamed = []
            for k, (c, got) in enumerate(zip(cols, col_names)):
                got = got if got is not None else list(map(_NAME, c))
                if got != names:
                    renamed += [(i, k + off, x) for i, (x, y) in enumerate(zip(got, names)) if x != y]
            return files, sorted(renamed)
    ins = [(b, *s) for b, s in zip(bases, srcs)]
    files = array("q", [fno.get(id(x.file if x is not None else None), -2) for row in ins for x in row])
    if -2 in files:  # a TensorInfo whose Path is not its index's own object: numbered by equality
        files = array("q", [-1 if x is None else fno_eq.get(x.file, -1) for row in ins for x in row])
    return files, [(i, k, x.name) for i, row in enumerate(ins) for k, x in enumerate(row)
                   if x is not None and x.name != names[i]]


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


#: Non-layer tensors that come before the layers (embeddings); every other non-layer tensor (final norm,
#: heads) comes after. Used to order a slices-built output and to take pre/post tensors from the first
#: and last slice, as mergekit does.
PRE_RE = re.compile(
    r"(embed|wte|wpe|tok_embeddings|word_embeddings|position_embeddings|token_type_embeddings|patch_embed|cls_token"
    r"|pos_embed|shared\.weight)"
)


def with_layer(name: str, idx: int) -> str:
    """``name`` with its layer index replaced by ``idx``."""
    m = LAYER_RE.search(name)
    assert m is not None, name
    return name[: m.start(1)] + str(idx) + name[m.end(1):]


_NO_PARAMS: dict[str, Any] = {}
_UNSET: Any = object()


def _resolve(method: MergeMethod, inputs: list[tuple[str, dict[str, Any]]], slice_params: dict[str, Any],
             global_params: dict[str, Any], name: str, t: float, seed: int, module_params: dict[str, Any] | None = None,
             cache: dict[Any, Any] | None = None) -> Any:
    """Resolve every parameter for one output tensor. Precedence: the input's own (slice source or
    model) parameters > the slice's > the module's (``modules``) > global; each value evaluated (filters,
    gradient at t). ``cache`` (one dict per plan): where every setting is a plain value (no filter, no
    gradient), the values are resolved once and each equal Params checked once: DeepSeek-V3 has 45k
    tensors, and resolving each took ~0.1 ms (bench/RESULTS.md, "MoE")."""
    srcs = [own for _, own in inputs] + [slice_params, module_params or _NO_PARAMS, global_params]
    key = None
    if cache is not None:
        key = tuple(map(id, srcs))
        plain = cache.get(("plain", key))
        if plain is None:
            plain = cache[("plain", key)] = not any(isinstance(v, (dict, list)) for src in srcs for v in src.values())
        key = key if plain else None
    if key is not None and method.tensor_free_params:
        done = cache.get(("params", key))
        if done is not None:  # plain values, and a Params that does not depend on the tensor: resolved and checked once
            return done
    hit = cache.get(key) if key is not None else None
    per_model, shared = hit if hit is not None else _values(method, inputs, slice_params, global_params, name, t, module_params)
    if key is not None and hit is None:
        cache[key] = (per_model, shared)
    params = method.make_params(per_model, shared, ParamContext(name, seed))
    try:
        if cache is not None and cache.setdefault(("checked", params), params) is not params:
            return cache[("checked", params)]  # an equal Params was checked: share it
    except TypeError:  # unhashable Params: checked every time
        pass
    try:
        method.check(params, f"tensor '{name}'")
    except ConfigError as e:  # the methods count models ("model #2"): name the model's path too
        if cache is not None:
            cache.pop(("checked", params), None)
        raise ConfigError(re.sub(r"model #(\d+)", lambda g: f"model #{g[1]} ({inputs[int(g[1]) - 1][0]})"
                                 if 0 < int(g[1]) <= len(inputs) else g[0], str(e))) from None
    if key is not None and method.tensor_free_params:
        cache[("params", key)] = params
    return params


def _values(method: MergeMethod, inputs: list[tuple[str, dict[str, Any]]], slice_params: dict[str, Any],
            global_params: dict[str, Any], name: str, t: float,
            module_params: dict[str, Any] | None) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """``_resolve``'s values: (per-model lists, shared values) for tensor ``name`` at ``t``."""
    from .methods.base import coerce

    per_model: dict[str, list[Any]] = {}
    shared: dict[str, Any] = {}
    for spec in method.params:
        if spec.per_model:
            vals = []
            for i, (path, own) in enumerate(inputs):
                v = None
                for src in (own, slice_params, module_params or {}, global_params):
                    if spec.name in src:
                        v = evaluate_setting(src[spec.name], name, t)
                        if v is not None:
                            break
                if v is None:
                    if spec.default is REQUIRED:
                        raise ConfigError(
                            f"model #{i + 1} ({path}): no value of '{spec.name}' applies to tensor '{name}' "
                            "(add a fallback {value: ...})"
                        )
                    v = spec.default
                vals.append(coerce(spec, v, f"model #{i + 1} ({path}), tensor '{name}'"))
            per_model[spec.name] = vals
        else:
            v = None
            for src in (slice_params, module_params or {}, global_params):
                if spec.name in src:
                    v = evaluate_setting(src[spec.name], name, t)
                    if v is not None:
                        break
            shared[spec.name] = coerce(spec, spec.default if v is None else v, f"parameters, tensor '{name}'")
    return per_model, shared


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
    if out.is_dir() and overwrite:
        from .io.outdir import refuse_foreign

        why = refuse_foreign(out)
        if why:
            raise OutputError(why)


@dataclasses.dataclass
class _Input:
    """A model feeding one output slice, from layer ``start`` on, with its own parameters."""

    path: str
    index: CheckpointIndex
    params: dict[str, Any]
    start: int = 0


@dataclasses.dataclass
class _Slice:
    inputs: list[_Input]  # non-base, config order
    base: _Input | None
    params: dict[str, Any]
    length: int
    base_path: str | None = None  # the configured base model (also for base-ignoring methods): preferred row donor
    module: ModuleLayout | None = None  # ``modules``: the module it belongs to (its layer numbering)
    module_params: dict[str, Any] = dataclasses.field(default_factory=dict)


def _module_slices(config: MergeConfig, open_index) -> tuple[list[list[_Slice]], dict[str, ModuleLayout]]:
    """``modules``: each configured module's slices (``models`` = one slice over the module's layers, whose
    number is its config.json key, as mergekit's), in config order. Names, coverage and the layers asked
    for are checked against the inputs' architecture (io.arch) here, before any tensor is planned."""
    assert config.modules is not None
    per_module = []
    for name, mod in config.modules.items():
        sub = dataclasses.replace(config, models=mod.models or [], slices=mod.slices, modules=None)
        slices, _ = _slices(sub, open_index)
        per_module.append((name, mod, slices))
    ref = next(iter(per_module))[2][0]
    ref_in = ref.base or ref.inputs[0]
    where = f"{config.source or 'config'}: modules"
    layouts = module_layouts(ref_in.index.root, where)
    arch = config_doc(ref_in.index.root)["architectures"][0]
    for name, _, _ in per_module:
        if name not in layouts:
            raise ConfigError(f"{where}.{name}: {arch} has no module '{name}' (its modules: {', '.join(layouts)})")
    seen: set[int] = set()
    for name, _, slices in per_module:
        for inp in [i for sl in slices for i in ([sl.base] if sl.base else []) + sl.inputs]:
            if id(inp.index) in seen:
                continue
            seen.add(id(inp.index))
            for t in inp.index.tensors:
                if module_of(t, layouts.values()) is None:
                    raise CheckpointError(f"{inp.path}: tensor '{t}' belongs to no module of {arch} "
                                          f"(modules: {', '.join(layouts)})")
    names = list(ref_in.index.tensors)
    for lay in layouts.values():
        if lay.name not in config.modules:
            own = [t for t in names if module_of(t, layouts.values()) is lay]
            if own:
                raise ConfigError(f"{where}: module '{lay.name}' of {arch} is not configured ({len(own)} tensors, e.g. "
                                  f"'{own[0]}'; mergekit would leave them out of the output): add modules.{lay.name}")
    out = []
    for name, mod, slices in per_module:
        lay = layouts[name]
        for sl in slices:
            sl.module, sl.module_params = lay, mod.parameters
        if mod.slices is None:  # models: every layer of the module, counted by the module's own config key
            ix = (slices[0].base or slices[0].inputs[0]).index
            slices[0].length = lay.num_layers(config_doc(ix.root), ix.tensors)
        out.append(slices)
    return out, layouts


def _module_parts(index: CheckpointIndex, layouts: dict[str, ModuleLayout], skip: frozenset[str]) -> dict[str, Any]:
    """Per module name, its tensors in ``index`` (file order) as (before the layers, {layer: names}, after)."""
    out: dict[str, Any] = {n: ([], {}, []) for n in layouts}
    for t in index.tensors:
        lay = module_of(t, layouts.values())
        if t in skip or lay is None:
            continue
        pre, layers, post = out[lay.name]
        li = lay.layer_of(t)
        if li is not None:
            layers.setdefault(li, []).append(t)
        else:
            (post if t in lay.post else pre).append(t)
    return out


def _slices(config: MergeConfig, open_index) -> tuple[list[_Slice], bool]:
    """Both syntaxes as slices. ``models`` = one slice over every layer of every model."""
    method = config.method
    if config.slices is None:
        based = config.base_model and method.base_policy != "ignored"
        base = _Input(config.base_model, open_index(config.base_model), {}) if based else None
        inputs = [_Input(m.path, open_index(m.path), m.parameters) for m in config.models]
        ref = base or inputs[0]
        return [_Slice(inputs, base, {}, _num_layers(ref.index), config.base_model)], False
    out = []
    for sl in config.slices:
        base_path = sl.base_model or config.base_model
        base, inputs = None, []
        for src in sl.sources:
            inp = _Input(src.path, open_index(src.path), src.parameters, src.layer_range[0])
            if method.base_policy != "ignored" and src.path == base_path and base is None:
                base = inp
            else:
                inputs.append(inp)
        out.append(_Slice(inputs, base, sl.parameters, sl.sources[0].length, base_path))
    return out, True


@gc_paused
def build_plan(config: MergeConfig, options: Options | None = None, out: str | Path | None = None) -> MergePlan:
    """Open every input's headers, resolve every tensor's parameters and backend, lay out the output."""
    options = options or Options()
    method = config.method
    device = backends.resolve_device(options.device)
    indexes: dict[str, CheckpointIndex] = {}

    adapters: dict[str, LoraAdapter] = {}  # MODEL+ADAPTER references (io.lora), by config path
    by_model: dict[str, CheckpointIndex] = {}
    headers: dict[Any, Any] = {}  # headers parsed, shared by the models' opens (io.index._read_header)

    def open_index(path: str) -> CheckpointIndex:
        if path not in indexes:
            model, lora = split_ref(path)
            if model not in by_model:
                by_model[model] = CheckpointIndex.open(model, headers)
            indexes[path] = by_model[model]
            if lora is not None:
                adapters[path] = LoraAdapter.open(lora, by_model[model], model)
        return indexes[path]

    module_slices, layouts, mconfig = None, {}, config
    if config.modules is None and config.slices is None:
        ref = config.base_model if config.base_model and method.base_policy != "ignored" else config.models[0].path
        multi = modular_architecture(open_index(ref).root)
        if multi:  # mergekit gives each module of such a model the same models, its layers counted on their own: a
            # gradient runs over the vision tower's layers, not over the text decoder's
            mconfig = dataclasses.replace(config, models=[], modules={m.name: ModuleSpec(config.models) for m in MODULES[multi]})
    if mconfig.modules is not None:
        for mod in mconfig.modules.values():  # every input opened first: mixed architectures are named before modules
            for path in [config.base_model] + [m.path for m in mod.models or []] + [
                    s.path for sl in mod.slices or [] for s in sl.sources] + [sl.base_model for sl in mod.slices or []]:
                if path:
                    open_index(path)
        check_architectures({p: ix.root for p, ix in indexes.items()}, options.allow_crimes)
        module_slices, layouts = _module_slices(mconfig, open_index)
        slices, sliced = module_slices[0], False
    else:
        slices, sliced = _slices(config, open_index)
        check_architectures({p: ix.root for p, ix in indexes.items()}, options.allow_crimes)
        multi = modular_architecture((slices[0].base or slices[0].inputs[0]).index.root) if sliced else None
        if multi:  # one layer numbering would mix the modules' layers (text and vision blocks both match LAYER_RE)
            names = ", ".join(m.name for m in MODULES[multi])
            raise ConfigError(f"{config.source or 'config'}: slices: {multi} has several modules ({names}); give each "
                              "module's slices under modules: {MODULE: {slices: [...]}} (mergekit 0.1.5 refuses top-level "
                              "slices on it too)")
    if out is not None:
        roots = [ix.root for ix in indexes.values()] + [Path(p) if Path(p).is_dir() else Path(p).parent for p in by_model]
        roots += [a.root for a in adapters.values()]
        check_output(Path(out), roots, options.overwrite)
    first = slices[0].base or slices[0].inputs[0]
    seed = options.seed or 0
    # FP8 inputs (io.fp8): weights paired with their scales; scales are companions, never output tensors
    fp8_of = {p: Fp8Index.of(ix) for p, ix in indexes.items()}
    fp8_family = list({id(f): f for f in fp8_of.values() if f.any}.values())
    out_fp8 = config.out_dtype if config.out_dtype and is_fp8(config.out_dtype) else None
    if out_fp8 and not fp8_family:
        raise ConfigError(f"out_dtype: {out_fp8} re-quantises the weights an FP8 input family holds in FP8, and no "
                          "input has FP8 weights (use bfloat16, float16 or float32)")
    companions = frozenset().union(*(f.companions for f in fp8_family))
    plans: list[TensorPlan] = []
    vocabs = None
    if config.tokenizer_source:
        from .config import referenced_models
        from .vocab import Vocabularies

        vocabs = Vocabularies(config.tokenizer_source, config.base_model or first.path, config.tokenizer_pad_to_multiple_of,
                              referenced_models(config), config.tokenizer_tokens)

    resolved: dict[Any, Any] = {}  # _resolve's cache
    chosen: dict[Any, tuple[str, dict[str, list[str]]]] = {}  # backend choices by (params, compat, numel): 45k tensors, a few shapes

    per_slice: dict[int, Any] = {}  # id(slice) -> what add() needs of it, taken once (a MoE model has 20k-45k tensors)
    fixed: dict[int, Any] = {}  # id(slice) -> the Params of every tensor of the slice, where they do not vary
    plain_out = (None if out_fp8 else config.out_dtype) or config.dtype  # the output dtype, where the config sets it
    compat = options.mergekit_compat

    def add(out_name: str, sl: _Slice, layer: int | None, t: float, out_layer: Any = _UNSET) -> None:
        """One output tensor from slice ``sl``: its layer ``layer`` (relative to the slice) or a non-layer tensor.
        ``out_layer``: ``layer_index(out_name)`` where the caller has it."""
        got = per_slice.get(id(sl))
        if got is None:
            members = ([sl.base] if sl.base else []) + sl.inputs
            got = per_slice[id(sl)] = (members, [(m.path, m.params) for m in sl.inputs], [m.index.tensors for m in members],
                                       sl.module.with_layer if sl.module is not None else with_layer, bool(sliced or sl.module))
        members, resolve_inputs, tables, relayer, renamed = got
        if layer is None or not renamed:
            infos = [tab.get(out_name) for tab in tables]
        else:
            infos = [tab.get(relayer(out_name, m.start + layer)) for m, tab in zip(members, tables)]
        if not all(infos):  # (TensorInfo has no __bool__: only None is false; `None in` would call its __eq__)
            k = infos.index(None)
            in_name = out_name if layer is None or not renamed else relayer(out_name, members[k].start + layer)
            raise CheckpointError(f"{members[k].path}: tensor '{in_name}' is missing (needed for output '{out_name}')")
        ref_info = infos[0]
        out_shape = ref_info.shape
        remap = _vocab_remap(vocabs, out_name, layer, members, infos, sl.base_path) if vocabs else None
        transform = lora_transform([adapters.get(m.path) for m in members], [i.name for i in infos], remap) if adapters else remap
        if fp8_family:
            transform = fp8_transform([fp8_of[m.path] for m in members], [i.name for i in infos], transform)
        if remap is not None:
            out_shape = (remap.n_rows, *ref_info.shape[1:])
        for m, info in zip(members, infos):
            if info.shape != ref_info.shape and (remap is None or info.shape[1:] != ref_info.shape[1:]):
                raise ShapeMismatchError(
                    f"tensor '{info.name}': shape {list(info.shape)} in {m.path} but {list(ref_info.shape)} in {members[0].path}"
                    + _vocab_hint(out_name, vocabs is not None, info.shape, ref_info.shape)
                )
        params = fixed.get(id(sl))
        if params is None:
            params = _resolve(method, resolve_inputs, sl.params, config.parameters, out_name, t, seed, sl.module_params,
                              cache=resolved)
            if method.tensor_free_params:  # plain settings: this Params for every tensor of the slice (_resolve)
                same = resolved.get(("params", tuple(map(id, [own for _, own in resolve_inputs]
                                                          + [sl.params, sl.module_params or _NO_PARAMS, config.parameters]))))
                if same is not None:
                    fixed[id(sl)] = same
        ref_dtype = ref_info.dtype
        if is_fp8(ref_dtype):  # FP8 inputs: a bf16 output by default
            ref_dtype = "bfloat16"
        out_dtype = plain_out or ref_dtype
        out_quant = None
        if out_fp8 and getattr(transform, "before_cast", False):
            out_quant = requant_for(out_name, out_shape, [d for d in transform.inputs if d is not None],
                                    next((f.block for f in fp8_family if f.block), None), out_fp8)
            if out_quant is not None:
                out_dtype = out_fp8
        numel = math.prod(out_shape)
        # what select reads besides the name (errors only); Params by identity (every one stays alive in `plans`;
        # an equal one elsewhere only misses the cache): hashing a frozen dataclass is a Python call per tensor
        chosen_key = (id(params), compat, numel)
        got = chosen.get(chosen_key)
        if got is None:
            got = chosen[chosen_key] = backends.select(MergeJob(out_name, method, params, compat, numel=numel), device, options.backend)
        backend, skipped = got
        plans.append(TensorPlan(
            out_name, out_shape, out_dtype, (config.dtype or ref_dtype) if compat else None, infos[0] if sl.base else None,
            infos[1:] if sl.base else infos, params, layer_index(out_name) if out_layer is _UNSET else out_layer, backend, skipped,
            transform, out_quant,
        ))

    module_layers: dict[str, list[int]] = {}
    lean = None  # the plan's columns, where the whole-model path made its rows from them (_lean_rest)
    if module_slices is not None:
        # modules, in config order: each one's tensors before its layers (first slice), its layers renumbered from 0
        # across its slices, the tensors after them (last slice), as mergekit's plan_module
        parts_of: dict[int, Any] = {}

        def parts(inp: _Input, lay: ModuleLayout) -> Any:
            if id(inp.index) not in parts_of:
                parts_of[id(inp.index)] = _module_parts(inp.index, layouts, companions)
            return parts_of[id(inp.index)][lay.name]

        for mslices, (mname, mod) in zip(module_slices, mconfig.modules.items()):
            lay = layouts[mname]
            head = mslices[0].base or mslices[0].inputs[0]
            for n in parts(head, lay)[0]:
                add(n, mslices[0], None, 0.0)
            offset, src_layers = 0, []
            for si, sl in enumerate(mslices):
                ref = sl.base or sl.inputs[0]
                for i in range(sl.length):
                    src_layers.append(ref.start + i)
                    layer_names = parts(ref, lay)[1].get(ref.start + i)
                    if not layer_names:
                        at = f"modules.{mname}" + (f".slices[{si}]" if mod.slices is not None else "")
                        raise CheckpointError(f"{ref.path}: {at} asks for layer {ref.start + i} of {mname}, which this model does not have")
                    t = i / (sl.length - 1) if sl.length > 1 else 1.0
                    for n in layer_names:
                        add(lay.with_layer(n, offset + i), sl, i, t)
                offset += sl.length
            tail = mslices[-1].base or mslices[-1].inputs[0]
            for n in parts(tail, lay)[2]:
                add(n, mslices[-1], None, 0.0)
            if mod.slices is not None:
                module_layers.update(dict.fromkeys(lay.layers_keys, src_layers))
            if mod.slices is None:  # models: an input must not hold tensors of the module the reference lacks
                pre, layers, post = parts(head, lay)
                mine = set(pre) | set(post) | {n for ns in layers.values() for n in ns}
                for m in mslices[0].inputs:
                    p, ls, q = parts(m, lay)
                    extra = [n for n in p + q + [n for ns in ls.values() for n in ns] if n not in mine]
                    if extra:
                        raise CheckpointError(f"{m.path}: tensor '{extra[0]}' is not in {head.path} (models must share tensor names)")
    elif not sliced:
        # whole models: output names = input names, in the reference model's file order (reads stay sequential)
        sl = slices[0]
        n_layers = sl.length
        # an FP8 weight's scale: read with its weight
        names = [n for n in first.index.tensors if n not in companions] if companions else list(first.index.tensors)

        def add_whole(name: str) -> None:
            li = layer_index(name)
            add(name, sl, li, 0.0 if li is None else (li / (n_layers - 1) if n_layers > 1 else 1.0), li)

        if names:  # the first through add(), which resolves the slice's parameters; the rest lean where they may be
            add_whole(names[0])
        lean = _lean_rest(plans, names, sl, method, fixed.get(id(sl)), vocabs or adapters or fp8_family, plain_out,
                          config.dtype, compat, chosen, device, options.backend) if names else None
        if lean is None:
            for name in names[1:]:
                add_whole(name)
            for m in sl.inputs:
                extra = [n for n in m.index.tensors if n not in first.index.tensors and n not in companions]
                if extra:
                    raise CheckpointError(f"{m.path}: tensor '{extra[0]}' is not in {first.path} (models must share tensor names)")
    else:
        names = list(first.index.tensors)
        non_layer = [n for n in names if layer_index(n) is None and n not in companions]
        for n in non_layer:  # embeddings, from the first slice (as mergekit's pre-weights)
            if PRE_RE.search(n):
                add(n, slices[0], None, 0.0)
        last = slices[-1].base or slices[-1].inputs[0]
        offset = 0
        for si, sl in enumerate(slices):
            ref = sl.base or sl.inputs[0]
            for i in range(sl.length):
                src_layer = ref.start + i
                layer_names = [n for n in ref.index.tensors if layer_index(n) == src_layer and n not in companions]
                if not layer_names:
                    raise CheckpointError(f"{ref.path}: slices[{si}] asks for layer {src_layer}, which this model does not have")
                t = i / (sl.length - 1) if sl.length > 1 else 1.0
                for n in layer_names:
                    add(with_layer(n, offset + i), sl, i, t)
            offset += sl.length
        for n in [n for n in last.index.tensors if layer_index(n) is None and not PRE_RE.search(n) and n not in companions]:
            add(n, slices[-1], None, 0.0)
    cols = lean if lean is not None else PlanColumns(plans)
    if lean is not None:  # (_lean_rest made every row's output tensor, and no FP8 output)
        outs = cols.out_tensor
    elif not any(cols.out_quant):
        # every TensorPlan's output tensor set column by column (a first read of each, one Python call, was ~1 us of a
        # MoE model's 20k-45k tensors); the same objects a read would have made and kept
        outs = cols.out_tensor = OutTensor.many(cols.name, cols.out_dtype, cols.shape)
        list(map(_SET_OUT, plans, outs))
    else:
        outs = []
        for p in plans:  # an FP8 output's scales right after their weight (same shard when it fits)
            outs.append(p.out_tensor)
            if p.out_quant is not None:
                outs.append(OutTensor(p.out_quant.scale_name, "float32", p.out_quant.scale_shape))
    shards = plan_shards(outs, options.out_shard_size, cols.out_nbytes if lean is not None else None)
    # config.json: mergekit's is the base model's (also for methods that ignore the base), else the first model's
    ref_root = indexes[config.base_model].root if config.base_model in indexes else first.index.root
    n_out_layers = sum(s.length for s in slices) if sliced else None
    built = MergePlan(config, options, device, indexes, ref_root, n_out_layers, plans, shards,
                      tokenizer=vocabs.output if vocabs else None, module_layers=module_layers or None,
                      fp8={"quantization_config": output_quant_config(fp8_family) if out_fp8 else None} if fp8_family else None)
    vars(built)["_columns"] = cols  # (MergePlan.columns: of this very list)
    return built


#: False: every tensor through ``build_plan``'s ``add`` (tests compare the two)
LEAN_WHOLE_MODELS = True


def _lean_rest(plans: list[TensorPlan], names: list[str], sl: _Slice, method: MergeMethod, params: Any, transforms: Any,
               plain_out: str | None, config_dtype: str | None, compat: bool, chosen: dict[Any, Any], device: str,
               backend_opt: Any) -> PlanColumns | None:
    """The tensors after the first of a whole-model merge whose inputs all list the same tensor names in the same
    order with the same shapes, whose parameters do not vary by tensor (``params``: the slice's one Params) and that
    no input transform touches: appended to ``plans`` exactly as ``add`` would make them, from the input tables
    side by side instead of a name lookup, shape check and parameter step per tensor (a MoE model has 20k-45k:
    ~2.5 of ~6 us per tensor of ``build_plan`` on moe-small). Returns the plan's ``PlanColumns``: the columns the rows
    were made from (the first row's own values at 0), ``out_tensor`` and ``out_nbytes``, ``inputs`` (the members'
    tables) and what it knows of them (``one``); None (nothing appended): not such a merge, ``add`` makes every
    tensor and reports what differs."""
    if not LEAN_WHOLE_MODELS or params is None or transforms or len(plans) != 1 or plans[-1].params is not params:
        return None
    members = ([sl.base] if sl.base else []) + sl.inputs
    first_ix = members[0].index
    tables = []
    for m in members:
        tab = m.index.tensors
        # (a model whose headers are the first's byte for byte has its names, order and shapes: not compared again)
        if len(tab) != len(names) or (not m.index.same_layout(first_ix) and list(tab) != names):
            return None  # FP8 companions, other names or another order
        tables.append(list(tab.values()))
    if any(map(is_fp8, first_ix.dtypes)):
        return None
    shapes = list(map(_SHAPE, tables[0]))
    # models of one header share the tuples: by identity
    if any(list(map(_SHAPE, tab)) != shapes for m, tab in zip(members[1:], tables[1:]) if not m.index.same_layout(first_ix)):
        return None
    # Column by column, each in C (map, zip, instances): a Python step per tensor with its row unpacked and sliced was
    # ~1.8 us of a MoE model's 20k-45k. The columns are of every tensor; the rows are made from the second on (the
    # first: add() made it, of the same values), and the first row's own objects then stand at 0 in each column.
    has_base = sl.base is not None
    n = len(names)
    refs = tables[0]  # each tensor's first member: its shape and dtype are every member's (checked above)
    # the backend per distinct shape object (the rows of a header share them), asked (if not cached) with the name of the
    # first tensor of that shape
    def backend_of(shape: tuple[int, ...], i: int) -> tuple[str, dict[str, list[str]]]:
        key = (id(params), compat, math.prod(shape))
        if key not in chosen:
            chosen[key] = backends.select(MergeJob(names[i], method, params, compat, numel=key[2]), device, backend_opt)
        return chosen[key]

    backends_seen = set()  # of the distinct shapes

    def backend_name(shape: tuple[int, ...], i: int) -> str:
        name = backend_of(shape, i)[0]
        backends_seen.add(name)
        return name

    backend = mapped_by_identity(shapes, backend_name)
    skipped = mapped_by_identity(shapes, lambda shape, i: backend_of(shape, i)[1])
    dts = list(map(_DTYPE, refs))
    out_dtypes = [plain_out] * n if plain_out else dts
    outs, out_nbytes = OutTensor.many(names, out_dtypes, shapes, sizes=True)
    compute = ([config_dtype] * n if config_dtype else dts) if compat else [None] * n
    cols = dict(zip(_PLAN_FIELDS, (
        names, shapes, out_dtypes, compute, refs if has_base else [None] * n,
        transposed(tables[1:] if has_base else tables), [params] * n, layer_indices(names),
        backend, skipped, [None] * n, [None] * n)))
    # the rows from their columns in one C call (instances): TensorPlan's __init__ per row was ~0.6 us
    plans.extend(instances(TensorPlan, (*_PLAN_FIELDS, "_out"), (*cols.values(), outs), n - 1, 1))
    first = plans[0]
    _SET_OUT(first, outs[0])
    for k, col in cols.items():
        col[0] = getattr(first, k)
    # the columns known to hold one value (PlanColumns.one): the input dtype where every model is one header of one dtype
    one_dtype = next(iter(first_ix.dtypes)) if len(first_ix.dtypes) == 1 else PlanColumns.VARIES
    twins = all(m.index.same_layout(first_ix) for m in members)
    known = {"params": params, "input_transform": None, "out_quant": None, "out_dtype": plain_out or one_dtype,
             "compute_dtype": (config_dtype or one_dtype) if compat else None, "in_dtype": one_dtype if twins else PlanColumns.VARIES}
    if len(backends_seen) == 1:
        known["backend"] = next(iter(backends_seen))
    # each member's table is its input column whole (the first tensor's too: add() took it from the same table)
    return PlanColumns(plans, {**cols, "out_tensor": outs, "out_nbytes": out_nbytes, "inputs": tables},
                       {k: v for k, v in known.items() if v is not PlanColumns.VARIES})


def _transform_json(tr: Any) -> dict[str, Any]:
    """``input_transform`` in ``plan --json``: a LoRA transform's own keys, else a row map's summary."""
    s = tr.summary()
    return s if "lora" in s or "fp8" in s else {"vocab_remap": s}


def _vocab_hint(name: str, aligning: bool, shape: tuple[int, ...] = (), ref: tuple[int, ...] = ()) -> str:
    """What to add to a shape error on an embedding / head tensor: a vocabulary hint only where the rows
    alone differ; other dimensions differing means other model sizes, whatever the tensor."""
    from .vocab import is_vocab_tensor

    if not is_vocab_tensor(name):
        return ""
    if tuple(shape[1:]) != tuple(ref[1:]):
        return " (the hidden sizes differ, not only the vocabularies: models of different sizes or architectures)"
    if aligning:
        return " (a vocabulary tensor, but its rows do not match its model's config.json vocab_size)"
    return " (vocabularies differ: set tokenizer_source: base, or a model, to align the rows as mergekit does)"


def _vocab_remap(vocabs: Any, name: str, layer: int | None, members: list[_Input], infos: list[TensorInfo],
                 base_path: str | None) -> Any:
    """The row map of ``name`` if it is a vocabulary tensor (by name, and its rows equal each model's
    config.json vocab_size when that is given), else None."""
    from .vocab import config_vocab_size, is_vocab_tensor

    if layer is not None or not is_vocab_tensor(name) or any(len(i.shape) == 0 for i in infos):
        return None
    for m, info in zip(members, infos):
        n = config_vocab_size(m.index.root)
        if n is not None and info.shape[0] != n:
            return None
    rm = vocabs.row_map([m.path for m in members], base_path)
    if rm.n_rows == rm.n_vocab and all(i.shape[0] == rm.n_vocab and rm.is_identity(k) for k, i in enumerate(infos)):
        return None  # same ids everywhere, no row added or dropped: a plain tensor (the native fast path can run it)
    for k, (m, info) in enumerate(zip(members, infos)):
        need = rm.src_rows_needed(k)
        if need > info.shape[0]:
            raise CheckpointError(f"{m.path}: tensor '{info.name}' has {info.shape[0]} rows but its tokenizer has ids up to {need - 1}")
    return rm
