"""Open a checkpoint and validate it before any tensor byte is read.

Accepted inputs (as Hugging Face and accelerate resolve them):
- a directory with ``model.safetensors``, or ``model.safetensors.index.json`` + its shards
  (or exactly one other ``*.safetensors.index.json`` / ``*.safetensors``);
- a single ``.safetensors`` file;
- PyTorch ``pytorch_model.bin`` (single or indexed) or a ``.bin`` file, loaded only with
  ``torch.load(weights_only=True, mmap=True)`` (no arbitrary unpickling).

Validation: index paths relative, no ``..``, no drive/UNC, shard extension matching the format, every
shard present, every tensor in exactly one shard, headers sane (length inside the file, JSON, offsets
contiguous and inside the file, byte size == numel·itemsize, a supported dtype).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import operator
import os
import re
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .. import _native
from .._memo import memo, replaced
from ..errors import CheckpointError

#: safetensors dtype names this project merges (others are rejected up front, naming the tensor).
#: F8_E4M3 / F8_E5M2: FP8 weights, dequantised with their scales as they are read (io.fp8)
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
ALL_ST_DTYPES = {
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64",
}
#: A safetensors header is JSON of a few hundred bytes per tensor; 100 MB is the library's own cap.
MAX_HEADER_BYTES = 100_000_000


#: Layer index in common naming schemes: LLaMA/Mistral/Qwen/Gemma "model.layers.3.", GPT-2 "h.3.",
#: BERT/T5 "layer.3." / "block.3.", ViT "blocks.3.", NeoX "gpt_neox.layers.3.".
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer a tensor name belongs to (``LAYER_RE``), None for non-layer tensors."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_indices(names: list[str]) -> list[int | None]:
    """``layer_index`` of each name: in one C loop (``_C.layer_indices``, ~30 ns a name; the regex search and int()
    were ~0.6 us of each of a MoE model's 20k-45k), else the search mapped over them."""
    if _NATIVE_LAYERS is not None:
        return _NATIVE_LAYERS(names if type(names) is list else list(names), layer_index)
    return [None if m is None else int(m[1]) for m in map(LAYER_RE.search, names)]


def neighbours_equal(values: list[Any]) -> list[bool] | None:
    """``values[i + 1] == values[i]`` for each i; None where all are (the common case, found in one C call)."""
    if values[1:] == values[:-1]:
        return None
    return list(map(operator.eq, values[1:], values))


@dataclasses.dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives and what it is. ``begin``/``end`` are absolute byte offsets in ``file``."""

    name: str
    file: Path
    dtype: str  # "float32" | "float16" | "bfloat16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(TensorInfo))


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Parse and validate one safetensors header; tensors returned in file (offset) order."""
    meta, by_name, _ = _read_header(path)
    return meta, list(by_name.values())


def _read_header(path: Path, shared: dict[Any, Any] | None = None) -> tuple[dict[str, Any], dict[str, TensorInfo], str]:
    """``read_safetensors_header``'s tensors by name (in file order), and the sha256 (hex) of the header's raw bytes
    (length included): the plan digest hashes it instead of the parsed table (3 x 20k rows of JSON for a MoE family).
    The table returned may be kept by the caller, never changed.

    The native parse (``_C.parse_safetensors_header``) runs first; it declines anything it does not take
    (every error among them), and ``_parse_header`` then parses the same bytes and raises its message.

    ``shared`` (one dict per plan, ``CheckpointIndex.open``): headers parsed already, by their bytes and file size.
    Fine-tunes of one model saved by one writer have byte-identical headers (the offsets follow from names,
    dtypes and shapes alone): a header seen before is not parsed again, its TensorInfo rows are made anew
    with this file from the first parse's rows (``_memo.replaced``: ~2 ms for 20k, against ~11 ms of parse), sharing its
    name strings and shape tuples, so the plan's later comparisons of names and shapes across models find
    the same objects. What a parse returns depends on nothing else (``data_start`` is the bytes' length)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    # a header seen before: by its length and the file's size, then its bytes compared (~0.1 ms for 2.4 MB, a
    # sha256 ~1.6 ms: the equal header's is reused)
    same_size = shared.setdefault((n, size), []) if shared is not None else []
    for seen, sha, meta, by_name in same_size:
        if seen == raw:
            return dict(meta), replaced(TensorInfo, _INFO_FIELDS, by_name, _INFO_FIELDS.index("file"), path), sha
    h = hashlib.sha256(head)
    h.update(raw)
    sha = h.hexdigest()
    # 20,347 entries (bench_moe.py's moe-small): ~0.15 s of CPU in the Python parse, ~0.01 s in the native one, which
    # makes the table by name as it goes
    parsed = _NATIVE_PARSE(raw, 8 + n, size, path, TensorInfo, ST_DTYPES, ITEMSIZE) if _NATIVE_PARSE else None
    if parsed is not None:
        meta, _, by_name = parsed
    else:
        meta, infos = _parse_header(path, raw, 8 + n, size)
        by_name = dict(zip(map(_NAME, infos), infos))  # (json.loads kept one entry per name)
    same_size.append((raw, sha, dict(meta), by_name))
    return meta, by_name, sha


#: the native layer_indices; None without ``_C`` (or a ``_C`` built before it)
_NATIVE_LAYERS = getattr(_native._C, "layer_indices", None) if _native.HAS_CPU_EXT else None
#: the native header parse; None without ``_C`` (or a ``_C`` built before it): ``_parse_header`` alone then
_NATIVE_PARSE = getattr(_native._C, "parse_safetensors_header", None) if _native.HAS_CPU_EXT else None


def _parse_header(path: Path, raw: bytes, data_start: int, size: int) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata, TensorInfo in file order) of a header's JSON bytes, checked; each problem raises its
    CheckpointError naming the file and the tensor."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    infos: list[TensorInfo] = []
    # (safetensors dtype, shape as written) -> (dtype, shape, bytes): a MoE header repeats a few shapes over
    # 20k-45k entries, each checked once (an unhashable or odd shape takes the checks every time)
    seen: dict[Any, tuple[str, tuple[int, ...], int]] = {}
    for name, entry in header.items():
        try:
            st_dtype, shape, (b, e) = entry["dtype"], entry["shape"], entry["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        try:
            dtype, shape, nbytes = seen[(st_dtype, *shape)]
        except (KeyError, TypeError):
            dtype, shape, nbytes = _entry_type(path, name, st_dtype, shape)
            try:
                seen[(st_dtype, *entry["shape"])] = (dtype, shape, nbytes)
            except TypeError:
                pass
        if e < b or e - b != nbytes:
            raise CheckpointError(f"{path}: tensor '{name}' has inconsistent shape {list(shape)} and offsets [{b}, {e}]")
        if data_start + e > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor '{name}' ends at byte {data_start + e}, file has {size}"
            )
        infos.append(TensorInfo(name, path, dtype, shape, data_start + b, data_start + e))
    infos.sort(key=lambda t: (t.begin, t.end))
    # the safetensors library's rules: the data section is the tensors back to back, from its first byte
    # to the end of the file - no overlap, no gap, nothing after (it refuses such files; so do we)
    pos = data_start
    for k, cur in enumerate(infos):
        if cur.begin < pos:
            raise CheckpointError(f"{path}: tensors '{infos[k - 1].name}' and '{cur.name}' overlap in the file")
        if cur.begin > pos:
            after = f"after tensor '{infos[k - 1].name}'" if k else "at the start of the data"
            raise CheckpointError(f"{path}: {cur.begin - pos} unused bytes {after} (tensor '{cur.name}' starts at "
                                  f"data offset {cur.begin - data_start}): not a valid safetensors layout")
        pos = cur.end
    if pos != size:
        raise CheckpointError(f"{path}: {size - pos} bytes after the last tensor: not a valid safetensors layout")
    return meta, infos


def _entry_type(path: Path, name: str, st_dtype: Any, shape: Any) -> tuple[str, tuple[int, ...], int]:
    """(dtype, shape, byte size) of one header entry, checked (``read_safetensors_header``); size -1 for a
    negative dimension (no offsets match it)."""
    try:
        shape = tuple(map(int, shape))
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
    dtype = ST_DTYPES.get(st_dtype) if isinstance(st_dtype, str) else None
    if dtype is None:
        kind = "unsupported" if isinstance(st_dtype, str) and st_dtype in ALL_ST_DTYPES else "unknown"
        raise CheckpointError(
            f"{path}: tensor '{name}' has {kind} dtype {st_dtype} (fastmerge merges F32, F16, BF16 and FP8 F8_E4M3/F8_E5M2)"
        )
    return dtype, shape, -1 if shape and min(shape) < 0 else math.prod(shape) * ITEMSIZE[dtype]


def _check_relative(index_path: Path, shard: str) -> None:
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index_path}: weight_map has an empty or non-string shard name")
    pw, pp = PureWindowsPath(shard), PurePosixPath(shard)
    if pp.is_absolute() or pw.is_absolute() or pw.drive or ".." in pp.parts or ".." in pw.parts:
        raise CheckpointError(f"{index_path}: shard path '{shard}' must be relative and stay inside the model folder")


_NAME, _DTYPE = operator.attrgetter("name"), operator.attrgetter("dtype")


@dataclasses.dataclass
class CheckpointIndex:
    """The tensors of one model checkpoint (headers only), in file order."""

    root: Path  # the model folder (config.json / tokenizer files live here)
    files: list[Path]
    tensors: dict[str, TensorInfo]  # insertion order = shard order, then offset order
    fmt: str  # "safetensors" | "bin"
    #: safetensors: the sha256 of each file's raw header, in ``files`` order (what ``tensors`` was parsed from,
    #: for the plan digest); None for pickles
    header_sha256: list[str] | None = None
    #: safetensors: how many tensors each file holds, in ``files`` order. The parse checked that a file's tensors
    #: lie back to back, no gap, in ``tensors``' order (``neighbours``); None where nothing checked it
    file_counts: list[int] | None = None
    #: the first index opened for the same plan whose files' headers are byte-identical to these, file by file
    #: (fine-tunes saved by one writer): the same names, dtypes, shapes and offsets in the same order, so what
    #: follows from those alone (``dtypes``, the adjacency of ``neighbours``, a plan's name and shape checks) is
    #: taken from it rather than again over 20k-45k tensors; None: this is the first (or not safetensors)
    twin: CheckpointIndex | None = dataclasses.field(default=None, repr=False, compare=False)

    @memo
    def dtypes(self) -> frozenset[str]:
        """The dtypes of the tensors (a twin's: the same)."""
        if self.twin is not None:
            return self.twin.dtypes
        return frozenset(map(_DTYPE, self.tensors.values()))

    def same_layout(self, other: CheckpointIndex) -> bool:
        """Whether ``other``'s files have headers byte-identical to these, file by file (twins, or the same index)."""
        return other is self or (self.twin or self) is (other.twin or other)

    @memo
    def neighbours(self) -> tuple[list[TensorInfo], list[bool] | None] | None:
        """(``tensors``' values, and for each after the first whether it starts where the one before ends, in the
        same file and dtype: None where all do), from the parsed layout without a step per tensor (a MoE model
        has 20k-45k); None for an index whose layout no parse checked. A twin's adjacency is the same."""
        if self.file_counts is None or sum(self.file_counts) != len(self.tensors):
            return None
        values = list(self.tensors.values())
        if self.twin is not None and self.twin.neighbours is not None:
            return values, self.twin.neighbours[1]
        adjacent = neighbours_equal(list(map(_DTYPE, values)))
        ends = list(itertools.accumulate(self.file_counts))[:-1]
        if ends:
            adjacent = adjacent or [True] * (len(values) - 1)
            for e in ends:
                if 0 < e <= len(adjacent):
                    adjacent[e - 1] = False  # the first tensor of the next file
        return values, adjacent

    @classmethod
    def open(cls, path: str | os.PathLike[str], shared: dict[Any, Any] | None = None) -> "CheckpointIndex":
        """The checkpoint at ``path`` (a folder, a ``.safetensors`` / ``.bin`` file or an ``.index.json``).
        ``shared``: a dict kept across the opens of one plan's models, which then parse a safetensors header
        byte-identical to one seen before only once (``_read_header``), and know a model whose headers all are
        another's (``twin``)."""
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: model path not found (fastmerge reads local checkpoints only; nothing is downloaded)")
        if p.is_file():
            if p.name.endswith(".index.json"):
                return cls._from_index(p, shared)
            if p.suffix == ".safetensors":
                return cls._from_safetensors(p.parent, [p], shared)
            if p.suffix in (".bin", ".pt", ".pth"):
                return cls._from_bin(p.parent, [p])
            raise CheckpointError(f"{p}: not a .safetensors, .bin or .index.json file")
        for idx_name in ("model.safetensors.index.json",):
            if (p / idx_name).is_file():
                return cls._from_index(p / idx_name, shared)
        if (p / "model.safetensors").is_file():
            return cls._from_safetensors(p, [p / "model.safetensors"], shared)
        st_idx = sorted(p.glob("*.safetensors.index.json"))
        if len(st_idx) > 1:
            raise CheckpointError(f"{p}: several safetensors index files ({', '.join(x.name for x in st_idx)}); pass one")
        if st_idx:
            return cls._from_index(st_idx[0], shared)
        st = sorted(p.glob("*.safetensors"))
        if len(st) == 1:
            return cls._from_safetensors(p, st, shared)
        if len(st) > 1:
            raise CheckpointError(f"{p}: several .safetensors files and no index.json; pass one file or add an index")
        if (p / "pytorch_model.bin.index.json").is_file():
            return cls._from_index(p / "pytorch_model.bin.index.json")
        if (p / "pytorch_model.bin").is_file():
            return cls._from_bin(p, [p / "pytorch_model.bin"])
        raise CheckpointError(f"{p}: no model.safetensors, *.index.json or pytorch_model.bin in this folder")

    @classmethod
    def _from_index(cls, index_path: Path, shared: dict[Any, Any] | None = None) -> "CheckpointIndex":
        try:
            doc = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
        wmap = doc.get("weight_map", doc) if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{index_path}: index has no weight_map")
        is_bin = ".bin." in index_path.name or index_path.name.startswith("pytorch_model")
        ext = (".bin",) if is_bin else (".safetensors",)
        shards: dict[str, None] = {}  # in first-seen order
        for name, shard in wmap.items():
            if shard in shards:
                continue  # checked already (an index lists each shard once per tensor: 45k times for DeepSeek-V3)
            _check_relative(index_path, shard)
            if not shard.endswith(ext):
                raise CheckpointError(f"{index_path}: shard '{shard}' of tensor '{name}' is not a {ext[0]} file")
            shards[shard] = None
        root = index_path.parent
        paths = {s: root / s for s in sorted(shards)}  # one Path per shard, not per tensor (Path() is ~20 us)
        files = list(paths.values())
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index_path.name} is missing")
        ck = cls._from_bin(root, files) if is_bin else cls._from_safetensors(root, files, shared)
        for name, shard in wmap.items():
            info = ck.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{root / shard}: tensor '{name}' listed in {index_path.name} is not in this shard")
            if info.file is not paths[shard] and info.file != paths[shard]:  # the same object when it matches
                raise CheckpointError(f"{info.file}: tensor '{name}' is here but {index_path.name} maps it to '{shard}'")
        extra = [n for n in ck.tensors if n not in wmap]
        if extra:
            raise CheckpointError(f"{ck.tensors[extra[0]].file}: tensor '{extra[0]}' is not in {index_path.name}'s weight_map")
        return ck

    @classmethod
    def _from_safetensors(cls, root: Path, files: list[Path], shared: dict[Any, Any] | None = None) -> "CheckpointIndex":
        tensors: dict[str, TensorInfo] = {}
        shas, counts = [], []
        for f in files:
            meta, by_name, sha = _read_header(f, shared)
            shas.append(sha)
            counts.append(len(by_name))
            fmt = meta.get("format") if isinstance(meta, dict) else None
            if fmt not in (None, "pt", "mlx", "np", "flax", "tf"):
                raise CheckpointError(f"{f}: safetensors format '{fmt}' is not a tensor checkpoint")
            if len(files) == 1:  # the parse's own table (kept, never changed: shared with later parses of its header)
                tensors = by_name
                break
            if tensors and not tensors.keys().isdisjoint(by_name):  # (a parse's names are unique within its file)
                for name in by_name:
                    if name in tensors:
                        raise CheckpointError(f"{f}: tensor '{name}' is also in {tensors[name].file.name}")
            tensors.update(by_name)  # dict to dict, in C (the names' hashes kept)
        ck = cls(root=root, files=files, tensors=tensors, fmt="safetensors", header_sha256=shas, file_counts=counts)
        if shared is not None:  # the first index of this plan with these headers is the twin of the later ones
            first = shared.setdefault(("index", *shas), ck)
            if first is not ck:
                ck.twin = first
        return ck

    @classmethod
    def _from_bin(cls, root: Path, files: list[Path]) -> "CheckpointIndex":
        import torch

        tensors: dict[str, TensorInfo] = {}
        rev = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for corrupt pickles
                why = f"{f}: cannot load with torch.load(weights_only=True) ({type(e).__name__}: {e})"
                raise CheckpointError(why.split("\n")[0]) from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: not a state dict")
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{f}: entry '{name}' is not a tensor")
                if t.dtype not in rev:
                    raise CheckpointError(f"{f}: tensor '{name}' has unsupported dtype {t.dtype} (fastmerge merges F32, F16 and BF16)")
                if name in tensors:
                    raise CheckpointError(f"{f}: tensor '{name}' is also in {tensors[name].file.name}")
                # offsets are meaningless for pickles: keep order of appearance, sized by bytes
                tensors[name] = TensorInfo(name, f, rev[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())
            del sd
        return cls(root=root, files=files, tensors=tensors, fmt="bin")


def index_in_own_order(column: list[TensorInfo], indexes: Any) -> CheckpointIndex | None:
    """Of ``indexes``, the one whose tensors, in its own order, are ``column`` (the plan's inputs of one model:
    compared by identity first, one C call) and whose layout a parse checked (``neighbours``); else None."""
    if not column:
        return None
    f = column[0].file
    for ix in indexes:
        if any(g is f for g in ix.files):
            known = ix.neighbours
            return ix if known is not None and known[0] == column else None
    return None
