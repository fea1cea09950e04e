"""Streaming output in the Hugging Face sharded-safetensors layout.

The shard layout is planned from shapes and dtypes alone (``plan_shards``), before any tensor is read:
each shard's header is therefore known up front, written first, and the tensors follow one by one as
they are merged. Nothing holds a whole shard in memory. Shards get their final names
(``model-0000i-of-0000N.safetensors``, or ``model.safetensors`` for one shard, as transformers and
mergekit name them) inside a temporary directory beside OUT; the index is written last and the directory
is renamed to OUT only when everything succeeded.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import operator
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from .. import _native
from .._lazy import torch
from .._memo import instances, mapped_by_identity
from ..errors import FastMergeError, OutputError
from .index import ITEMSIZE

#: tensor names that are their own JSON string body (printable ASCII, no quote, no backslash)
_PLAIN_NAMES = re.compile(r'[ !#-\[\]-~]*')
_NAME, _SHAPE, _DTYPE, _NBYTES = (operator.attrgetter(a) for a in ("name", "shape", "dtype", "nbytes"))
ST_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
#: mergekit's --out-shard-size default: 5 billion bytes
DEFAULT_SHARD_BYTES = 5_000_000_000


#: size suffixes: mergekit's K/M/B (thousand, million, *billion*: its parse_kmb), the decimal byte units
#: and the binary ones. "5B" is 5 billion bytes, as in mergekit, not 5 bytes.
SIZE_UNITS = {
    "": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(text: str | int, flag: str = "--out-shard-size") -> int:
    """A size in bytes: an integer, or a number with a suffix (``SIZE_UNITS``): mergekit's ``5B`` (5
    billion bytes), ``500M``, ``100K``; ``5GB``, ``500MB``; ``2GiB``."""
    if isinstance(text, int) and not isinstance(text, bool):
        v = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in SIZE_UNITS:
            raise FastMergeError(f"{flag}: cannot parse size '{text}' (use bytes, or e.g. 5B = 5GB = 5 billion bytes, "
                                 "500M = 500MB, 2GiB)")
        v = int(float(m.group(1)) * SIZE_UNITS[unit])
    if v <= 0:
        raise FastMergeError(f"{flag}: size must be positive, got '{text}'")
    return v


@dataclasses.dataclass(frozen=True, init=False, slots=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    #: bytes of the tensor, from the other fields (not compared): the shards, their header, the digest and the
    #: engines each ask, 80k times for a MoE family of 20k tensors; computed here, as every plan asks at once
    #: (plan_shards), not on first use (a property cached on first use cost ~0.5 us more a tensor)
    nbytes: int = dataclasses.field(init=False, repr=False, compare=False)

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...]):
        put = object.__setattr__  # frozen
        put(self, "name", name)
        put(self, "dtype", dtype)
        put(self, "shape", shape)
        put(self, "nbytes", math.prod(shape) * ITEMSIZE[dtype])

    @staticmethod
    def many(names: list[str], dtypes: list[str], shapes: list[tuple[int, ...]], sizes: bool = False) -> Any:
        """``list(map(OutTensor, names, dtypes, shapes))``, made from the columns at once (``_memo.instances``: a
        plan of a MoE model makes 20k-45k; ~0.5 us each through ``__init__``). Each distinct (dtype, shape)'s
        byte size computed once: a model has a few dozen. ``sizes``: (the rows, their byte sizes)."""
        if dtypes[1:] == dtypes[:-1] and dtypes:  # one dtype: sizes by shape object (a plan shares them)
            size = ITEMSIZE[dtypes[0]]
            nbytes = mapped_by_identity(shapes, lambda shape, i: math.prod(shape) * size)
        else:
            keys = list(zip(dtypes, shapes))
            by_key = {k: math.prod(k[1]) * ITEMSIZE[k[0]] for k in set(keys)}
            nbytes = list(map(by_key.__getitem__, keys))
        rows = instances(OutTensor, _FIELDS, (names, dtypes, shapes, nbytes), len(names))
        return (rows, nbytes) if sizes else rows


_FIELDS = tuple(f.name for f in dataclasses.fields(OutTensor))


@dataclasses.dataclass
class Shard:
    filename: str
    tensors: list[OutTensor]
    #: header_bytes' last result, for this list at this length: a run asks for it up to 5 times per shard (digest,
    #: manifest, writer, resume check, commit), and a shard of 20k tensors takes ~70 ms to dump each time
    _head: tuple[list[OutTensor], int, bytes] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    #: header_sha256's last result, for the header bytes object it hashed
    _sha: tuple[bytes, str] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def header_bytes(self) -> bytes:
        memo = self._head
        if memo is not None and memo[0] is self.tensors and memo[1] == len(self.tensors):
            return memo[2]
        head = self._header_bytes()
        self._head = (self.tensors, len(self.tensors), head)
        return head

    def header_sha256(self) -> str:
        """sha256 (hex) of ``header_bytes()``, kept with it: the plan digest, the manifest line of a finished shard and
        the resume check each ask (~1.6 ms each for a 20k-tensor shard's 2.4 MB)."""
        head = self.header_bytes()
        memo = self._sha
        if memo is not None and memo[0] is head:
            return memo[1]
        sha = hashlib.sha256(head).hexdigest()
        self._sha = (head, sha)
        return sha

    def _header_bytes(self) -> bytes:
        """The header as ``json.dumps({"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...},
        separators=(",", ":"))`` writes it, built as text: a dict per tensor dumped by json took ~9 us a tensor,
        20k-45k of them in a MoE model's shard. Names of printable ASCII other than quote and backslash (checked
        once over all) are their own JSON; any other name is escaped by json.dumps."""
        ts = self.tensors
        # in C from the rows (_C.safetensors_header: ~4 ms for 20k, against ~13 ms for an f-string a tensor); it
        # declines a name that needs an escape, which ``_entries`` then writes
        got = _NATIVE_HEADER(ts if type(ts) is list else list(ts), ST_NAME, _HEAD) if _NATIVE_HEADER is not None else None
        if got is not None:
            return got
        names = list(map(_NAME, ts))
        st_dtypes = list(map(ST_NAME.__getitem__, map(_DTYPE, ts)))
        raw = _HEAD + _entries(names, st_dtypes, list(map(_SHAPE, ts)), list(map(_NBYTES, ts))) + b"}"
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors pads
        return len(raw).to_bytes(8, "little") + raw


#: what every header written here opens with
_HEAD = b'{"__metadata__":{"format":"pt"}'


def _entries(names: list[str], st_dtypes: list[str], shapes: list[tuple[int, ...]], sizes: list[int]) -> bytes:
    """The header's tensor entries, ``,"name":{"dtype":..,"shape":[..],"data_offsets":[a,b]}`` each (what
    ``_C.safetensors_header`` writes, and any name json.dumps escapes), offsets accumulated from ``sizes``."""
    plain = _PLAIN_NAMES.fullmatch("".join(names)) is not None
    text = {sh: ",".join(str(int(d)) for d in sh) for sh in set(shapes)}
    ends = list(itertools.accumulate(sizes))
    # the columns taken in C, one f-string per tensor (str.format mapped over them is twice as slow)
    rows = zip(names if plain else map(json.dumps, names), st_dtypes, map(text.__getitem__, shapes), [0, *ends[:-1]], ends)
    q = '"' if plain else ""
    return "".join([f',{q}{n}{q}:{{"dtype":"{d}","shape":[{sh}],"data_offsets":[{a},{b}]}}' for n, d, sh, a, b in rows]).encode()


#: the native header writer; None without ``_C`` (or a ``_C`` built before it): ``_entries`` alone
_NATIVE_HEADER = getattr(_native._C, "safetensors_header", None) if _native.HAS_CPU_EXT else None


def greedy_cuts(ends: list[int], limit: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """Items ``lo``..``hi - 1`` cut greedily into consecutive groups ``[a, b)``: a group takes the next item while its
    bytes stay within ``limit``, an item larger than that is a group of its own. ``ends``: the running byte total
    over all items (``ends[i]``: bytes of items 0..i). Found by bisecting ``ends``: a step per group, not per item
    (20k-45k tensors in a MoE model: the shards of ``plan_shards``, the engine's runs of small tensors)."""
    a = lo
    while a < hi:
        b = max(a + 1, bisect.bisect_right(ends, (ends[a - 1] if a else 0) + limit, a, hi))
        yield a, b
        a = b


def plan_shards(tensors: Sequence[OutTensor], max_shard_bytes: int, nbytes: Sequence[int] | None = None) -> list[Shard]:
    """Group tensors (in output order) into shards of at most ``max_shard_bytes``; a larger tensor gets
    a shard of its own. Same rule as mergekit's writer, so layouts match. ``nbytes``: the tensors' byte sizes,
    where the caller has them as a column."""
    tensors = list(tensors)
    ends = list(itertools.accumulate(map(_NBYTES, tensors) if nbytes is None else nbytes))
    groups = [tensors[a:b] for a, b in greedy_cuts(ends, max_shard_bytes, 0, len(tensors))]
    n = len(groups)
    if n == 1:
        return [Shard("model.safetensors", groups[0])]
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def temp_dir_beside(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.fastmerge-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


class ShardWriter:
    """Writes planned shards tensor by tensor, in plan order, into ``tmp_dir``."""

    def __init__(self, tmp_dir: Path, shards: Sequence[Shard], on_shard: Callable[[Shard, int, str], None] | None = None):
        """``on_shard(shard, size, checksum)``: called after each shard file is complete and closed, with its
        size and the ``io.checksum`` value of its bytes (computed as they are written; only when ``on_shard``
        is given)."""
        self.dir = tmp_dir
        self.shards = list(shards)
        # every planned tensor in write order, and where each shard's tensors end in it (a list of pairs made per
        # tensor was ~3 ms of a 20k-tensor output; a run is checked by slices of these, not a step per tensor)
        self._planned: list[OutTensor] = list(itertools.chain.from_iterable(s.tensors for s in self.shards))
        self._ends = list(itertools.accumulate(len(s.tensors) for s in self.shards))
        self._next = 0
        self._file: BinaryIO | None = None
        self._on_shard = on_shard
        self._sum: Any = None
        self._size = 0
        self.bytes_written = 0

    def write(self, name: str, tensor: "torch.Tensor | memoryview") -> None:
        """Append the next tensor of the plan: a CPU tensor of the planned dtype and shape, or (the
        torch-free fast path) a memoryview of exactly the planned number of bytes, in the planned dtype."""
        if self._next >= len(self._planned):
            raise FastMergeError(f"writer: unexpected extra tensor '{name}'")
        si, planned = self._shard_at(self._next), self._planned[self._next]
        if planned.name != name:
            raise FastMergeError(f"writer: expected tensor '{planned.name}', got '{name}' (out of plan order)")
        nbytes = planned.nbytes  # once: a MoE output has tens of thousands of tensors
        if isinstance(tensor, memoryview):
            data = tensor.cast("B")
            if data.nbytes != nbytes:
                raise FastMergeError(f"writer: tensor '{name}' has {data.nbytes} bytes, planned {nbytes}")
        else:
            if tuple(tensor.shape) != planned.shape or str(tensor.dtype).removeprefix("torch.") != planned.dtype:
                raise FastMergeError(
                    f"writer: tensor '{name}' is {tensor.dtype} {list(tensor.shape)}, planned {planned.dtype} {list(planned.shape)}"
                )
            data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        self._append(si, data, 1)

    def write_run(self, names: Sequence[str], data: "torch.Tensor | memoryview") -> None:
        """Append the next ``len(names)`` tensors of the plan, whose bytes lie back to back in ``data`` (a
        memoryview, or a contiguous 1-D CPU tensor of their planned dtype): one file write per output shard they
        fall in, instead of one per tensor (20k tensors of 4 KB: ~40 us each in ``write``)."""
        first, n = self._next, len(names)
        if first + n > len(self._planned):
            raise FastMergeError(f"writer: unexpected extra tensor '{names[len(self._planned) - first]}'")
        dtype = None  # a memoryview's bytes are taken as planned, as in ``write``
        if isinstance(data, memoryview):
            data = data.cast("B")
        else:
            dtype = str(data.dtype).removeprefix("torch.")
            data = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        planned = self._planned[first:first + n]
        got = list(names)
        if list(map(_NAME, planned)) != got:
            k = next(k for k, (t, name) in enumerate(zip(planned, got)) if t.name != name)
            raise FastMergeError(f"writer: expected tensor '{planned[k].name}', got '{got[k]}' (out of plan order)")
        if dtype is not None and set(map(_DTYPE, planned)) != {dtype}:
            bad = next(t for t in planned if t.dtype != dtype)
            raise FastMergeError(f"writer: tensor '{bad.name}' is {dtype}, planned {bad.dtype}")
        sizes = list(itertools.accumulate(map(_NBYTES, planned), initial=0))
        if sizes[-1] != data.nbytes:
            raise FastMergeError(f"writer: tensors '{names[0]}'..'{names[-1]}' have {data.nbytes} bytes, planned {sizes[-1]}")
        # one part per output shard the run falls in, written once all of them are checked
        k = 0
        while k < n:
            si = self._shard_at(first + k)
            stop = min(n, self._ends[si] - first)
            self._append(si, data[sizes[k]:sizes[stop]], stop - k)
            k = stop

    def _shard_at(self, i: int) -> int:
        """The shard of planned tensor ``i``."""
        return bisect.bisect_right(self._ends, i)

    def _append(self, si: int, data: memoryview, count: int) -> None:
        """Write ``data``, the bytes of the next ``count`` planned tensors (all of shard ``si``)."""
        if self._file is None:
            self._file = open(self.dir / self.shards[si].filename, "wb")
            head = self.shards[si].header_bytes()
            self._file.write(head)
            if self._on_shard is not None:
                from .checksum import Checksum

                self._sum, self._size = Checksum(), len(head)
                self._sum.update(head)
        self._file.write(data)
        if self._on_shard is not None:
            self._sum.update(data)  # the GIL is released while it hashes
            self._size += data.nbytes
        self.bytes_written += data.nbytes
        self._next += count
        if self._next == self._ends[si]:
            self._file.close()
            self._file = None
            if self._on_shard is not None:
                self._on_shard(self.shards[si], self._size, self._sum.value())

    def finalize(self, index: bool = True) -> None:
        """Check every planned tensor was written; write the index (sharded output only; ``index=False``:
        a share of an output whose index another process writes)."""
        if self._next != len(self._planned):
            raise FastMergeError(f"writer: {len(self._planned) - self._next} planned tensors were never written")
        if index:
            write_index(self.dir, self.shards)

    def abort(self, remove_partial: bool = False) -> None:
        """Close the shard being written (``remove_partial``: and delete it: it is incomplete)."""
        if self._file is not None:
            self._file.close()
            if remove_partial:
                Path(self._file.name).unlink(missing_ok=True)
            self._file = None


def write_index(dir: Path, shards: Sequence[Shard]) -> None:
    """``model.safetensors.index.json`` of ``shards`` in ``dir`` (nothing for a one-shard output)."""
    if len(shards) > 1:
        total = sum(t.nbytes for s in shards for t in s.tensors)
        from .._version import __version__

        index = {
            "metadata": {"total_size": total, "fastmerge_version": __version__},
            "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
        }
        with open(dir / "model.safetensors.index.json", "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


def commit_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is replaced only with ``overwrite``."""
    if out.exists():
        if not overwrite:
            raise OutputError(f"{out}: output exists (pass --overwrite to replace it)")
        from .outdir import refuse_foreign

        why = refuse_foreign(out)  # checked again here: files may have appeared during the merge
        if why:
            raise OutputError(why)
        old = out.parent / f".{out.name}.fastmerge-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
