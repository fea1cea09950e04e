"""FP8 checkpoints: ``F8_E4M3`` / ``F8_E5M2`` weights and their scales, dequantised per tensor as the engine reads them.

Layouts (the scale multiplies: ``W = W_fp8 · s``):

- **block** (DeepSeek-V3, Qwen3-FP8; ``quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}``):
  ``W`` [rows, cols] beside ``W_scale_inv`` [ceil(rows/128), ceil(cols/128)] in fp32, one scale per
  128×128 block, the last block of a dimension partial.
- **per-tensor** / **per-channel** (compressed-tensors, FBGEMM: ``W_scale`` or ``W_scale_inv`` of one
  element, or of [rows] / [rows, 1]), where the checkpoint declares no block size.
- an FP8 tensor with no scale beside it is read with scale 1.

``Fp8Index.of(index)`` pairs every FP8 weight of a checkpoint with its scale (headers only; a scale whose
shape does not fit its weight is one ``ShapeMismatchError`` naming both). Scales, and the activation scales
``*.input_scale`` beside FP8 weights, are companions: never merged as weights. In the plan a tensor with an
FP8 input gets an ``Fp8Transform`` as its ``TensorPlan.input_transform``: each FP8 input is dequantised to
fp32 (``dequantize``, the specification), the others pass as they are, and every method runs its fp32
math on them. The output is bf16 (``config.json``'s ``quantization_config`` removed) unless ``out_dtype:
float8_e4m3fn``: then the weights FP8 in the input family are re-quantised with the family's block scheme
(``quantize_blocks``: scale = amax / 448 per block) and their ``*_scale_inv`` written beside them
(``Requant`` on ``TensorPlan.out_quant``), and ``quantization_config`` is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..errors import CheckpointError, ShapeMismatchError
from .index import CheckpointIndex, TensorInfo

#: the FP8 dtype names of plans and headers (``TensorInfo.dtype``), by safetensors name
FP8_ST = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FP8_DTYPES = frozenset(FP8_ST.values())
#: largest finite value of each format (the quantiser's amax target)
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
#: scale companions of weight ``W``: ``W_scale_inv`` (DeepSeek-V3's name), ``W_scale`` (compressed-tensors)
SCALE_SUFFIXES = ("_scale_inv", "_scale")
DEFAULT_BLOCK = (128, 128)


def is_fp8(dtype: str) -> bool:
    return dtype in FP8_DTYPES


def quant_config(root: Path) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` (a dict), else None."""
    p = root / "config.json"
    if not p.is_file():
        return None
    try:
        q = json.loads(p.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return q if isinstance(q, dict) else None


def block_size(q: dict[str, Any] | None) -> tuple[int, int] | None:
    """The declared ``weight_block_size`` ([bm, bn]), else None."""
    b = (q or {}).get("weight_block_size")
    if isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b):
        return int(b[0]), int(b[1])
    return None


@dataclasses.dataclass(frozen=True)
class Dequant:
    """How one FP8 input is read: ``kind`` "block" | "channel" | "tensor" | "none" (scale 1)."""

    weight: TensorInfo
    scale: TensorInfo | None
    kind: str
    block: tuple[int, int] | None = None

    def __repr__(self) -> str:
        # what plan digests hash: no path; the scale by its name (the digest hashes the input headers, which say where
        # it lies and what it is: its file, dtype, shape and offsets written out here were ~3.5 us a Dequant)
        s = self.scale
        return f"Dequant({self.weight.name!r}, {self.weight.dtype}, {self.kind}, {self.block}, {None if s is None else s.name!r})"

    def summary(self) -> dict[str, Any]:
        return {"dtype": self.weight.dtype, "scale": None if self.scale is None else self.scale.name, "kind": self.kind,
                **({"block": list(self.block)} if self.block else {})}


def _classify(w: TensorInfo, s: TensorInfo, block: tuple[int, int] | None) -> tuple[str, tuple[int, int] | None]:
    rows = w.shape[0] if w.shape else 1
    if block is not None:
        if len(w.shape) == 2:
            want = (math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1]))
            if s.shape == want:
                return "block", block
            why = f"blocks of {block[0]}x{block[1]} need scales {list(want)}"
        else:
            why = f"block scales ({block[0]}x{block[1]}) need a matrix"
    elif s.numel == 1:
        return "tensor", None
    elif s.shape in ((rows,), (rows, 1)) and len(w.shape) >= 1:
        return "channel", None
    else:
        why = "expected one scale (per tensor) or one per row (per channel); no weight_block_size in config.json"
    raise ShapeMismatchError(f"{s.file}: scale '{s.name}' has shape {list(s.shape)} but weight '{w.name}' has "
                             f"{list(w.shape)} ({why})")


@dataclasses.dataclass
class Fp8Index:
    """One checkpoint's FP8 weights paired with their scales; ``companions``: names that are not weights."""

    quant: dict[str, Any] | None
    block: tuple[int, int] | None
    dequant: dict[str, Dequant]  # FP8 weight name -> how to read it
    companions: frozenset[str]

    _cache: ClassVar[dict[int, tuple[Any, "Fp8Index"]]] = {}

    @classmethod
    def of(cls, index: CheckpointIndex) -> "Fp8Index":
        hit = cls._cache.get(id(index))
        if hit is not None and hit[0] is index:
            return hit[1]
        q = quant_config(index.root)
        block = block_size(q)
        if block is None and q is not None and q.get("quant_method") == "fp8" and "weight_block_size" in q:
            raise CheckpointError(f"{index.root / 'config.json'}: quantization_config.weight_block_size "
                                  f"{q['weight_block_size']!r} is not two positive integers")
        tensors = index.tensors
        twin = Fp8Index.of(index.twin) if index.twin is not None else None
        if twin is not None and twin.quant == q:
            # headers byte-identical to an earlier model's and the same quantization config: its pairing and its
            # classification, with this model's own rows (the checks and lookups were ~2.7 us an FP8 weight)
            get = tensors.__getitem__
            deq = {n: Dequant(get(n), None if d.scale is None else get(d.scale.name), d.kind, d.block)
                   for n, d in twin.dequant.items()}
            out = cls(q, block, deq, twin.companions)
            cls._cache[id(index)] = (index, out)
            return out
        deq = {}
        comp: set[str] = set()
        fp8_names = tensors.items() if any(map(is_fp8, index.dtypes)) else ()  # most models: none
        for name, w in fp8_names:
            if not is_fp8(w.dtype):
                continue
            s = next((tensors[name + suf] for suf in SCALE_SUFFIXES if name + suf in tensors), None)
            if s is None:
                deq[name] = Dequant(w, None, "none")
                continue
            if is_fp8(s.dtype):
                raise CheckpointError(f"{s.file}: scale '{s.name}' of weight '{name}' is {s.dtype}, not a float scale")
            kind, blk = _classify(w, s, block)
            deq[name] = Dequant(w, s, kind, blk)
            comp.add(s.name)
            if name.endswith(".weight") and name[: -len("weight")] + "input_scale" in tensors:
                comp.add(name[: -len("weight")] + "input_scale")
        out = cls(q, block, deq, frozenset(comp))
        cls._cache[id(index)] = (index, out)
        return out

    @property
    def any(self) -> bool:
        return bool(self.dequant)


# ------------------------------------------------------------------------------------------------
# the math (the specification: every other path matches it)


def _per_block(x: Any, s: Any, block: tuple[int, int], op: str) -> Any:
    """``x`` (2-D, fp32) multiplied (``op`` "mul") or divided ("div") in place by its block scales ``s``
    [ceil(r/bm), ceil(c/bn)] (the last block of each dimension partial), broadcast without expanding them
    to one per element."""
    r, c = x.shape
    bm, bn = block
    sc = s.repeat_interleave(bn, dim=1)[:, :c]  # [R, c]: one row of scales per block row (small)
    full = r // bm
    if full:
        getattr(x[: full * bm].view(full, bm, c), op + "_")(sc[:full].unsqueeze(1))
    if r % bm:
        getattr(x[full * bm:], op + "_")(sc[full])
    return x


def dequantize(w: Any, scale: Any | None, kind: str = "block", block: tuple[int, int] | None = DEFAULT_BLOCK,
               out: Any = None) -> Any:
    """``w`` (an FP8 tensor) times its scale in fp32: per block, per row or per tensor (``kind``)."""
    from .._lazy import torch

    x = w.to(torch.float32) if out is None else out.copy_(w)
    if scale is None or kind == "none":
        return x
    s = scale.to(device=x.device, dtype=torch.float32)
    if kind == "tensor":
        return x.mul_(s.reshape(()))
    if kind == "channel":
        return x.mul_(s.reshape((x.shape[0],) + (1,) * (x.dim() - 1)))
    return _per_block(x, s, block, "mul")


def quantize_blocks(x: Any, block: tuple[int, int] = DEFAULT_BLOCK, dtype: str = "float8_e4m3fn") -> tuple[Any, Any]:
    """``x`` (2-D) as ``(fp8 tensor, fp32 scales [ceil(r/bm), ceil(c/bn)])``: scale = amax / FP8_MAX per block
    (1 for an all-zero block), values ``x / scale`` rounded to nearest by torch's cast."""
    from .._lazy import torch

    r, c = x.shape
    bm, bn = block
    R, C = math.ceil(r / bm), math.ceil(c / bn)
    xf = x.to(torch.float32, copy=True)
    a = xf.abs()
    if c % bn:
        a = torch.nn.functional.pad(a, (0, C * bn - c))
    if r % bm:
        a = torch.nn.functional.pad(a, (0, 0, 0, R * bm - r))
    amax = a.view(R, bm, C, bn).amax(dim=(1, 3))
    del a
    scale = torch.where(amax > 0, amax / FP8_MAX[dtype], torch.ones_like(amax))
    q = _per_block(xf, scale, block, "div").clamp_(-FP8_MAX[dtype], FP8_MAX[dtype]).to(getattr(torch, dtype))
    return q, scale


def quantize_rows(x: Any, dtype: str = "float8_e4m3fn") -> tuple[Any, Any]:
    """Per-channel: one scale per row ([rows, 1]) of amax / FP8_MAX."""
    from .._lazy import torch

    xf = x.to(torch.float32)
    amax = xf.abs().reshape(xf.shape[0], -1).amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX[dtype], torch.ones_like(amax))
    q = (xf / scale.reshape((xf.shape[0],) + (1,) * (xf.dim() - 1))).clamp_(-FP8_MAX[dtype], FP8_MAX[dtype])
    return q.to(getattr(torch, dtype)), scale


# ------------------------------------------------------------------------------------------------
# the plan's transforms


@dataclasses.dataclass
class Fp8Transform:
    """``TensorPlan.input_transform`` of a tensor with an FP8 input: per input (base first, as the engines
    pass them) its ``Dequant`` or None (read as it is); ``then``: the transform to apply afterwards (a
    tokenizer_source row map or a LoRA update). Applied before mergekit_compat's cast (``before_cast``)."""

    inputs: list[Dequant | None]
    then: Any = None

    describe: ClassVar[str] = "FP8 inputs (dequantised per tensor)"
    before_cast: ClassVar[bool] = True

    def raw_reasons(self) -> list[str]:
        """Why the native kernels cannot read these inputs as they are stored (``sources``); [] if they can."""
        if self.then is not None:
            return ["FP8 inputs with a vocabulary remap or a LoRA update on top (applied to the dequantised tensor)"]
        for d in self.inputs:
            if d is not None and d.scale is not None and d.scale.dtype not in _SCALE_CODES:
                return [f"scale '{d.scale.name}' is {d.scale.dtype} (the kernels read float32, bfloat16 or float16 scales)"]
        return []

    def sources(self, tensors: Sequence[Any]) -> list[Any]:
        """The inputs as the native kernels read them: each FP8 one (a raw view or a torch tensor of its bytes)
        as an ``_native.Fp8Source`` with its scales widened to fp32 (read here, small), dequantised inside the
        fused pass by the kernels' load step (bit-identical to ``dequantize``); the others as they are. Torch-free
        on raw views."""
        from .. import _native

        res = []
        for x, d in zip(tensors, self.inputs):
            if d is None:
                res.append(x)
                continue
            ptr, n = (x.data_ptr(), x.numel()) if hasattr(x, "data_ptr") else (x.ptr, x.numel)
            scale = None if d.scale is None or d.kind == "none" else read_scale(d.scale)
            res.append(_native.Fp8Source(ptr, n, d.weight.dtype, d.weight.shape, d.kind if scale is not None else "none",
                                         0 if scale is None else scale.buffer_info()[0], 0 if scale is None else len(scale),
                                         d.block, keep=(x, scale)))
        return res

    def summary(self) -> dict[str, Any]:
        s = {"fp8": [None if d is None else d.summary() for d in self.inputs]}
        if self.then is not None:
            inner = self.then.summary()
            s.update(inner if "lora" in inner else {"vocab_remap": inner})
        return s

    def apply(self, tensors: Sequence[Any], compat: bool,
              out: Callable[[Any, tuple[int, ...], Any], Any] | None = None) -> list[Any]:
        from .._lazy import torch

        from .lora import read_tensor

        res = []
        for k, (x, d) in enumerate(zip(tensors, self.inputs)):
            if d is None:
                res.append(x)
                continue
            scale = read_tensor(d.scale) if d.scale is not None else None
            buf = None if out is None else out(("fp8", k), tuple(x.shape), torch.float32)
            res.append(dequantize(x, scale, d.kind, d.block, out=buf))
        if self.then is not None:
            return list(self.then.apply(res, compat, out=out) if out is not None else self.then.apply(res, compat))
        return res


#: scale dtypes the native kernels take (widened to fp32 by ``read_scale``)
_SCALE_CODES = ("float32", "bfloat16", "float16")


def read_scale(info: TensorInfo) -> Any:
    """A scale tensor as an ``array('f')`` of fp32 values, without torch: bf16 widened by a shift, fp16 by
    ``struct`` (both exact), little-endian as safetensors stores them."""
    import array
    import struct

    try:
        with open(info.file, "rb") as f:
            f.seek(info.begin)
            data = f.read(info.nbytes)
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read scale '{info.name}' ({e.strerror or e})") from None
    if len(data) != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading scale '{info.name}'")
    out = array.array("f")
    if info.dtype == "float32":
        out.frombytes(data)
    elif info.dtype == "bfloat16":
        h = array.array("H", data)
        out.frombytes(array.array("I", (v << 16 for v in h)).tobytes())
    elif info.dtype == "float16":
        out.extend(struct.unpack(f"<{len(data) // 2}e", data))
    else:
        raise CheckpointError(f"{info.file}: scale '{info.name}' is {info.dtype}, not float32, bfloat16 or float16")
    return out


def fp8_transform(fp8s: Sequence[Fp8Index | None], names: Sequence[str], then: Any = None) -> Any:
    """The ``input_transform`` of one tensor read as ``names`` from inputs whose FP8 indexes are ``fp8s``:
    an ``Fp8Transform`` when one is FP8, else ``then``."""
    ds = [(f.dequant.get(n) if f is not None else None) for f, n in zip(fp8s, names)]
    if not any(ds):
        return then
    return Fp8Transform(ds, then)


@dataclasses.dataclass(frozen=True)
class Requant:
    """``TensorPlan.out_quant``: the merged fp32 tensor re-quantised to ``dtype`` with blocks of ``block``
    (None: one scale per row); its scales written as ``scale_name`` right after it."""

    scale_name: str
    scale_shape: tuple[int, ...]
    block: tuple[int, int] | None
    dtype: str = "float8_e4m3fn"

    def quantize(self, x: Any) -> tuple[Any, Any]:
        if self.block is None:
            q, s = quantize_rows(x, self.dtype)
        else:
            q, s = quantize_blocks(x, self.block, self.dtype)
        return q, s.reshape(self.scale_shape)


def requant_for(name: str, shape: tuple[int, ...], ds: Sequence[Dequant], family_block: tuple[int, int] | None,
                out_dtype: str) -> Requant | None:
    """How output ``name`` is stored under ``out_dtype`` (an FP8 dtype), given its FP8 inputs ``ds``: re-quantised
    as they were (a block input: its blocks; per-channel: one scale per row; a 2-D tensor read with scale 1 or a
    per-tensor scale: the family's blocks), the scale named as theirs; None if no input holds it in FP8."""
    if not ds:
        return None
    d = next((x for x in ds if x.kind == "block"), ds[0])
    suffix = d.scale.name[len(d.weight.name):] if d.scale is not None else "_scale_inv"
    if d.kind == "channel" or len(shape) != 2:
        return Requant(name + suffix, (shape[0], 1) if len(shape) else (1,), None, out_dtype)
    block = d.block or family_block or DEFAULT_BLOCK
    return Requant(name + suffix, (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])), block, out_dtype)


def output_quant_config(family: Sequence[Fp8Index]) -> dict[str, Any] | None:
    """The ``quantization_config`` an FP8 output keeps: the first input's that declares one."""
    return next((dict(f.quant) for f in family if f.quant), None)


def fix_config(doc: dict[str, Any], plan: Any) -> None:
    """config.json of the output: ``quantization_config`` kept for an FP8 output (``torch_dtype`` stays
    bfloat16, as FP8 checkpoints declare it), removed when FP8 inputs were dequantised to a float output."""
    fp8 = getattr(plan, "fp8", None)
    if fp8 is None:
        return
    if fp8.get("quantization_config") is not None:
        doc["quantization_config"] = fp8["quantization_config"]
        for k in [k for k in ("torch_dtype", "dtype") if k in doc] or ["torch_dtype"]:
            if is_fp8(str(doc.get(k))) or k not in doc:
                doc[k] = "bfloat16"
    else:
        doc.pop("quantization_config", None)
        text = doc.get("text_config")
        if isinstance(text, dict):
            text.pop("quantization_config", None)
