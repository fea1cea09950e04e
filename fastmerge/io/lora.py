"""PEFT LoRA adapters as inputs: ``model+lora`` references, read and checked at plan time, applied per tensor.

A reference ``path/to/model+path/to/adapter`` (mergekit's syntax, anywhere a model is named) is the model
with the adapter merged in, as PEFT's ``merge_and_unload()`` computes it, but one tensor at a time as the
engine reads it: the model is never materialised (mergekit loads the whole model with transformers, merges
and saves a copy first). ``split_ref`` parses a reference as mergekit does (split on ``+``, at most one
adapter), except that an existing path whose name holds a ``+`` stays a plain path.

The adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout; a
``.bin``-only adapter is refused with the conversion to do). ``LoraAdapter.open`` reads the config and the
header (no tensor byte), maps every saved tensor to the model tensor it changes and checks it against the
model's headers:

- ``<module>.lora_A.weight`` / ``lora_B.weight`` (Linear; ``fan_in_fan_out`` for GPT-2's Conv1D, whose
  weight is stored transposed) and ``<module>.lora_embedding_A`` / ``lora_embedding_B`` (Embedding):
  ``W += scale · B @ A`` (transposed for embeddings and ``fan_in_fan_out``), scale = ``lora_alpha / r``, or
  ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and ``lora_alpha`` per module from ``rank_pattern`` /
  ``alpha_pattern`` (PEFT's rule: a key matches a module name that ends with it at a ``.`` boundary, the
  first matching key wins). ``<module>.lora_B.bias`` (``lora_bias: true``): ``bias += scale · b``.
- every other saved tensor (``modules_to_save`` copies, ``bias: all | lora_only`` biases, and the
  ``<module>.base_layer.weight`` that PEFT saves for adapted embeddings) replaces the model's tensor of that
  name, cast to its dtype, before any delta.

Arithmetic, as PEFT's merge on the CPU with its default ``autocast_adapter_dtype``: A and B in fp32, the
delta ``(B @ A) * scale`` (transposed before scaling where PEFT does), added to the weight in fp32 and rounded
once to the weight's dtype. Bit-identical to ``merge_and_unload()`` for fp32 models; bf16/fp16 within one
rounding of the weight's dtype (tests/io/test_lora.py). Large tensors are done in row blocks of
``BLOCK_BYTES`` of fp32 delta.

Unsupported adapter kinds are refused naming the file and field: another ``peft_type`` (LoHa, LoKr, IA3,
AdaLoRA, ...), ``use_dora``, ``use_qalora``, ``use_bdlora``, ``layer_replication``, ``target_parameters``,
``trainable_token_indices``, conv LoRA (4-D factors), any ``lora_*`` tensor that is not a plain factor
(e.g. DoRA's ``lora_magnitude_vector``).

In the plan, a tensor with an adapter update on any input gets a ``LoraTransform`` as its
``TensorPlan.input_transform`` (holding a tokenizer_source row map to apply after, if both apply); the
torch and GPU engines apply it before the method; the torch-free native engine refuses such plans.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..errors import CheckpointError, ConfigError, ShapeMismatchError
from .index import CheckpointIndex, TensorInfo, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT's prefix of every saved key (``PeftModel`` → ``LoraModel`` → the transformers model)
PREFIX = "base_model.model."
#: fp32 delta bytes computed at once (a 128k×4096 embedding is done in 64 MiB row blocks)
BLOCK_BYTES = 64 << 20

#: config fields that change what the adapter computes in ways fastmerge does not apply: (field, why)
UNSUPPORTED_FIELDS = (
    ("use_dora", "DoRA (weight-decomposed LoRA) adapters are not supported"),
    ("use_qalora", "QA-LoRA adapters are not supported"),
    ("use_bdlora", "BD-LoRA adapters are not supported"),
    ("layer_replication", "layer replication changes the model's layers; not supported"),
    ("target_parameters", "LoRA on nn.Parameter targets (MoE experts) is not supported"),
    ("trainable_token_indices", "trainable token deltas are not supported"),
)

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$")


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"model+adapter"`` → ``("model", "adapter")``; a plain path → ``(path, None)``. As mergekit's
    ``ModelReference``: split on ``+``, more than one ``+`` is an error; but an existing path whose name
    holds a ``+`` is a plain path (mergekit would split it)."""
    if "+" not in ref or Path(ref).exists():
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"'{ref}': a LoRA reference is MODEL+ADAPTER (one '+'; no such path exists either)")
    return parts[0], parts[1]


def pattern_key(keys: Sequence[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first of ``keys`` that ``module`` ends with at a ``.`` boundary."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", module):
            return k
    return None


@dataclasses.dataclass(frozen=True)
class LoraUpdate:
    """One adapter's change to one model tensor: ``kind`` "matrix" (Linear) | "embedding" (``W += scale · B @ A``,
    transposed for embeddings and ``transpose``), "bias" (``bias += scale · b``: ``b`` only) or "replace"
    (the tensor becomes ``replace``)."""

    adapter: str
    target: str
    kind: str
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    scale: float = 1.0
    transpose: bool = False
    replace: TensorInfo | None = None

    def __repr__(self) -> str:  # what plan digests hash: no absolute path
        def loc(x: TensorInfo | None) -> Any:
            return None if x is None else (x.file.name, x.name, x.dtype, x.shape, x.begin, x.end)

        return f"LoraUpdate({self.adapter!r}, {self.target!r}, {self.kind}, {loc(self.a)}, {loc(self.b)}, " \
               f"{self.scale!r}, {self.transpose}, {loc(self.replace)})"

    @property
    def rank(self) -> int:
        return self.a.shape[0] if self.a is not None else 0

    def summary(self) -> dict[str, Any]:
        if self.kind == "replace":
            return {"adapter": self.adapter, "replace": self.replace.name}
        return {"adapter": self.adapter, "kind": self.kind, "rank": self.rank, "scale": self.scale,
                **({"fan_in_fan_out": True} if self.transpose else {})}

    def apply(self, x: Any, buf: Any) -> Any:
        """``x`` with this update, written into ``buf`` (x's shape and dtype); returns ``buf``."""
        from .._lazy import torch

        if self.kind == "replace":
            buf.copy_(read_tensor(self.replace))
            return buf
        if self.kind == "bias":
            d = read_tensor(self.b).float() * self.scale
            torch.add(x, d, out=buf)
            return buf
        A, B = read_tensor(self.a).float(), read_tensor(self.b).float()
        rows = x.shape[0]
        step = max(1, BLOCK_BYTES // max(1, 4 * x[0].numel())) if rows else 1
        whole = step >= rows
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if self.kind == "matrix" and not self.transpose:  # W rows = B rows
                d = (B @ A if whole else B[r0:r1] @ A) * self.scale
            else:  # W = (B @ A)^T: W rows = A columns
                d = (B @ A).T * self.scale if whole else (B @ A[:, r0:r1]).T * self.scale
            torch.add(x[r0:r1], d, out=buf[r0:r1])
        return buf


def read_tensor(info: TensorInfo) -> Any:
    """One safetensors tensor read into memory (adapter factors are small)."""
    from .._lazy import torch, torch_dtype

    try:
        with open(info.file, "rb") as f:
            f.seek(info.begin)
            data = bytearray(f.read(info.nbytes))
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor '{info.name}' ({e.strerror or e})") from None
    if len(data) != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading tensor '{info.name}'")
    if not data:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(data, dtype=torch_dtype(info.dtype)).view(info.shape)


@dataclasses.dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, checked against the model it is applied to: the updates of each model tensor."""

    ref: str  # the adapter path as written
    root: Path
    config: dict[str, Any]
    updates: dict[str, tuple[LoraUpdate, ...]]  # model tensor name -> updates, in application order

    @classmethod
    def open(cls, ref: str, model: CheckpointIndex, model_ref: str) -> "LoraAdapter":
        p = ParsedAdapter.read(ref, f" (from '{model_ref}+{ref}'; nothing is downloaded)")
        cfg, wpath, root, factors, replaces = p.config, p.weights, p.root, p.factors, p.replaces
        updates: dict[str, list[LoraUpdate]] = {}

        def target(name: str, by: TensorInfo) -> TensorInfo:
            t = model.tensors.get(name)
            if t is None:
                raise CheckpointError(f"{wpath}: tensor '{by.name}' is for '{name}', which {model_ref} does not have")
            return t

        for name, info in replaces.items():
            t = target(name, info)
            if t.shape != info.shape:
                raise ShapeMismatchError(f"{wpath}: tensor '{info.name}' has shape {list(info.shape)} but '{name}' in "
                                         f"{model_ref} has {list(t.shape)}")
            updates.setdefault(name, []).append(LoraUpdate(ref, name, "replace", replace=info))
        for mod, parts in factors.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
            a, b = parts.get(ka), parts.get(kb)
            if a is None or b is None:
                have = (a or b).name
                raise CheckpointError(f"{wpath}: tensor '{have}' has no matching '{kb if a else ka}'")
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise CheckpointError(f"{wpath}: tensor '{a.name}' has shape {list(a.shape)}: only Linear and Embedding "
                                      "LoRA layers are supported (not conv)")
            scale = p.scale(mod, a, b)
            fifo = bool(cfg.get("fan_in_fan_out"))
            w = target(f"{mod}.weight", a)
            if len(w.shape) != 2:
                raise ShapeMismatchError(f"{wpath}: '{mod}.weight' in {model_ref} has shape {list(w.shape)}, not a matrix")
            transpose = emb or fifo
            want = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            if w.shape != want:
                raise ShapeMismatchError(
                    f"{wpath}: '{a.name}' {list(a.shape)} and '{b.name}' {list(b.shape)} make a {list(want)} delta, but "
                    f"'{mod}.weight' in {model_ref} has shape {list(w.shape)} (an adapter for another model?)")
            updates.setdefault(w.name, []).append(
                LoraUpdate(ref, w.name, "embedding" if emb else "matrix", a, b, scale, fifo and not emb))
            bias = parts.get("lora_B.bias")
            if bias is not None:
                bt = target(f"{mod}.bias", bias)
                if bt.shape != bias.shape:
                    raise ShapeMismatchError(f"{wpath}: tensor '{bias.name}' has shape {list(bias.shape)} but '{bt.name}' "
                                             f"in {model_ref} has {list(bt.shape)}")
                updates.setdefault(bt.name, []).append(LoraUpdate(ref, bt.name, "bias", b=bias, scale=scale))
        return cls(ref, root, cfg, {k: tuple(v) for k, v in updates.items()})


@dataclasses.dataclass
class ParsedAdapter:
    """An adapter folder read without a model: its config, and its tensors by module (``factors``: the
    ``_LORA_KEY`` parts of each module) or as whole tensors by model tensor name (``replaces``)."""

    root: Path
    config_path: Path
    weights: Path
    config: dict[str, Any]
    factors: dict[str, dict[str, TensorInfo]]
    replaces: dict[str, TensorInfo]

    @classmethod
    def read(cls, ref: str | Path, hint: str = " (nothing is downloaded)") -> "ParsedAdapter":
        root = Path(ref)
        cfg_path = root / ADAPTER_CONFIG
        if not root.is_dir():
            raise CheckpointError(f"{root}: LoRA adapter folder not found{hint}")
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing (a PEFT LoRA adapter folder has {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        cfg = read_adapter_config(cfg_path)
        wpath = root / ADAPTER_WEIGHTS
        if not wpath.is_file():
            alt = " (only adapter_model.bin: load it and save it with safetensors)" if (root / "adapter_model.bin").is_file() else ""
            raise CheckpointError(f"{wpath}: missing{alt}")
        _, infos = read_safetensors_header(wpath)
        factors: dict[str, dict[str, TensorInfo]] = {}
        replaces: dict[str, TensorInfo] = {}
        for info in infos:
            key = info.name
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{wpath}: tensor '{key}' does not start with '{PREFIX}' (not a PEFT adapter for a model)")
            key = key[len(PREFIX):]
            m = _LORA_KEY.match(key)
            if m:
                factors.setdefault(m["mod"], {})[m["part"]] = info
            elif "lora_" in key:
                raise CheckpointError(f"{wpath}: tensor '{info.name}' is not a plain LoRA factor (DoRA / other variants "
                                      "are not supported)")
            else:
                replaces[key.replace(".base_layer.", ".")] = info
        return cls(root, cfg_path, wpath, cfg, factors, replaces)

    def rank_alpha(self, mod: str) -> tuple[int, float, str | None]:
        """(r, lora_alpha, the rank_pattern key that set r) of module ``mod``, PEFT's rule."""
        cfg = self.config
        rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rk, ak = pattern_key(list(rank_pat), mod), pattern_key(list(alpha_pat), mod)
        return (rank_pat[rk] if rk is not None else cfg["r"]), (alpha_pat[ak] if ak is not None else cfg["lora_alpha"]), rk

    def scale(self, mod: str, a: TensorInfo, b: TensorInfo) -> float:
        """PEFT's ``scaling`` of module ``mod``, after checking its factors' rank against the config."""
        r, alpha, rk = self.rank_alpha(mod)
        if a.shape[0] != r or b.shape[1] != r:
            field = f"rank_pattern['{rk}']" if rk is not None else "r"
            raise CheckpointError(f"{self.config_path}: {field} = {r} but '{a.name}' / '{b.name}' have rank "
                                  f"{a.shape[0]} / {b.shape[1]}")
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked: a LoRA adapter fastmerge can apply (else one line naming the field)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type '{kind}' is not supported (fastmerge applies LoRA adapters only)")
    for field, why in UNSUPPORTED_FIELDS:
        if cfg.get(field):
            raise CheckpointError(f"{path}: {field}: {why}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{path}: r: expected a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{path}: lora_alpha: expected a number, got {alpha!r}")
    for field, typ in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pat = cfg.get(field) or {}
        if not isinstance(pat, dict) or not all(isinstance(v, typ) and not isinstance(v, bool) for v in pat.values()):
            raise CheckpointError(f"{path}: {field}: expected a mapping of module patterns to numbers")
    return cfg


@dataclasses.dataclass
class LoraTransform:
    """``TensorPlan.input_transform`` of a tensor some input's adapter changes: per input (base first, as
    the engines pass them) its updates; ``then``: a tokenizer_source row map applied afterwards (the adapter
    works on the model's own rows)."""

    updates: list[tuple[LoraUpdate, ...]]
    then: Any = None

    describe: ClassVar[str] = "a LoRA adapter (model+lora)"

    def summary(self) -> dict[str, Any]:
        return {"lora": [[u.summary() for u in ups] for ups in self.updates],
                **({"vocab_remap": self.then.summary()} if self.then is not None else {})}

    def apply(self, tensors: Sequence[Any], compat: bool,
              out: Callable[[Any, tuple[int, ...], Any], Any] | None = None) -> list[Any]:
        """The inputs with their adapters merged in (each in its own dtype), then the row map if any.
        ``out(key, shape, dtype)``: where to write (default: new tensors)."""
        from .._lazy import torch

        res = []
        for k, (x, ups) in enumerate(zip(tensors, self.updates)):
            if not ups:
                res.append(x)
                continue
            key = ("lora", k) if self.then is not None else k
            buf = torch.empty(x.shape, dtype=x.dtype) if out is None else out(key, tuple(x.shape), x.dtype)
            for u in ups:
                x = u.apply(x, buf)
            res.append(x)
        if self.then is not None:
            return list(self.then.apply(res, compat, out=out))
        return res


def lora_transform(adapters: Sequence[LoraAdapter | None], names: Sequence[str], then: Any = None) -> Any:
    """The ``input_transform`` of one tensor whose inputs are read as ``names`` through ``adapters`` (None: a
    plain model): a ``LoraTransform`` when an adapter changes it, else ``then`` (a row map or None)."""
    ups = [(a.updates.get(n, ()) if a is not None else ()) for a, n in zip(adapters, names)]
    if not any(ups):
        return then
    return LoraTransform(ups, then)
