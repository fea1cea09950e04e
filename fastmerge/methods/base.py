"""The merge-method contract: typed parameters + a torch reference that *is* the specification.

A method declares its parameters (mergekit's names and defaults), builds a frozen ``Params`` dataclass
from per-model lists and global scalars, and implements ``reference()`` in readable torch. Every
accelerated backend (C++, Triton, CUDA) is tested against ``reference``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

from .._lazy import torch

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its mergekit name, kind, default (``REQUIRED`` if none) and per-model or global scope."""

    name: str
    kind: type  # float, bool, str, int
    default: Any
    per_model: bool
    doc: str = ""
    choices: tuple[str, ...] | None = None


class _Required:
    """The default of a parameter that has none: a config must set it."""

    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()


@dataclasses.dataclass(frozen=True)
class ParamContext:
    """What a method may need besides its parameters: the output tensor's name and the run's seed.

    Random methods (DARE, DELLA) draw their keep masks from a counter-based generator keyed by
    (seed, ``key``, element index), so every backend gives the same output for the same seed,
    whatever the tensor order, threading or device."""

    tensor: str = ""
    seed: int = 0

    @property
    def key(self) -> int:
        """A stable 63-bit hash of the tensor name (not Python's salted ``hash``)."""
        import hashlib

        return int.from_bytes(hashlib.blake2b(self.tensor.encode(), digest_size=8).digest(), "little") >> 1


#: the largest finite float32
FLOAT32_MAX = 3.4028234663852886e38


def round_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (ties to even, as a C cast); ±inf beyond fp32's range."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def coerce(spec: ParamSpec, value: Any, where: str) -> Any:
    """Validate and convert one resolved scalar; errors name ``where`` (model / tensor / field). Numbers
    must be finite and within float32's range (the merge computes in float32): ``lambda: "1e400"`` is
    refused, not merged into an inf/NaN model."""
    if value is REQUIRED:
        raise ConfigError(f"{where}: missing required parameter '{spec.name}'")
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: parameter '{spec.name}' must be a boolean, got {value!r}")
    if spec.kind in (float, int):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: parameter '{spec.name}' must be a number, got {value!r}")
        try:
            v = float(value)
        except OverflowError:
            v = math.inf  # an integer beyond float64: refused below
        except ValueError:
            raise ConfigError(f"{where}: parameter '{spec.name}' must be a number, got {value!r}") from None
        if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
            what = "not a finite number" if not math.isfinite(v) else "beyond float32's range"
            raise ConfigError(f"{where}: parameter '{spec.name}' is {what}, got {value!r}")
        return int(v) if spec.kind is int else v
    if spec.kind is str:
        v = str(value)
        if spec.choices and v not in spec.choices:
            raise ConfigError(f"{where}: parameter '{spec.name}' must be one of {list(spec.choices)}, got {v!r}")
        return v
    raise TypeError(spec.kind)


def _no_reasons(*_: Any) -> list[str]:
    return []


def _no_scratch(rows: int) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class NativeKernel:
    """How a fused C++ kernel (``fastmerge._native``) runs a method: declared on the method, next to its
    reference, so that ``backends.native`` (and ``backends.cuda``) read declarations instead of testing names.

    Torch-free: the torch-free engine (``engine.stream.RawIO``) and the planner read it without torch."""

    #: ``run(method, params, out, inputs, base, threads, shape)``: calls the kernel's one ``_native`` wrapper,
    #: which takes torch tensors (``NativeBackend.run``) or raw views (``run_raw``: ``ptr``, ``dtype``,
    #: ``numel``); ``shape`` is the tensor's shape (raw views carry none; None for tensors)
    run: Callable[..., None]
    #: parameter values the kernel does not cover (the torch reference runs them), one line each
    reasons: Callable[[Any], list[str]] = _no_reasons
    #: ``(params, input dtype, output dtype)``: why a run on raw views cannot do what ``run`` on tensors
    #: does (passthrough's scale or cast goes through torch), one line each
    raw_reasons: Callable[[Any, str, str], list[str]] = _no_reasons
    #: the same wrapper also runs CUDA tensors (``fastmerge._C_cuda``: the ``cuda`` backend)
    cuda: bool = False
    #: each output element depends only on the inputs' elements at its index (and the Params): tensors of
    #: equal Params, packed one after another, merge as one buffer in one call (engine/stream.py's batches)
    elementwise: bool = False
    #: ``segments(method, params, out, inputs, base, threads, offsets)``: the kernel over consecutive segments
    #: ``[offsets[s], offsets[s + 1])`` of packed buffers, each merged as its own tensor, in one call (None:
    #: one ``run`` per tensor); for raw views, as ``run``
    segments: Callable[..., None] | None = None


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """How the Triton kernels (``fastmerge.kernels``) run a method: read by ``backends.triton`` (which
    tensors they take) and ``engine.gpu`` (batches, scratch, row chunks) instead of testing names.

    Torch-free (the planner asks ``reasons`` for every tensor of a CPU merge too, which must not import
    torch); the kernel code is imported only when a batch runs."""

    #: ``"<module>:<class>"`` in ``fastmerge.kernels``: the kernel plan, with ``key(method, params)`` (its
    #: compile-time flags: tensors of equal key share a launch) and ``for_batch(method, params, shapes,
    #: device, in_dtypes, base_dtype)`` (the plan for a batch, from the original inputs' dtypes)
    kernel: str
    #: parameter values the kernels do not cover (the torch reference runs them), one line each
    reasons: Callable[[Any], list[str]] = _no_reasons
    #: mergekit_compat emulated: the fp32 result is rounded to the inputs' (compute) dtype, then to the
    #: output's (mergekit's two roundings); other methods' compat arithmetic is the torch reference's
    compat: bool = False
    #: device scratch in bytes per element of a unit, given its packed rows (base + models)
    scratch_bytes: Callable[[int], int] = _no_scratch
    #: a row chunk must hold whole rows along dim 0 (the method ranks within rows): a 1-D tensor is one
    #: row and cannot be chunked; otherwise 1-D tensors are chunked by elements
    whole_rows: bool = False


class MergeMethod(ABC):
    """Base class of every merge method. Subclasses are stateless singletons registered in ``methods/__init__``."""

    name: ClassVar[str]
    paper_url: ClassVar[str]
    #: "required" | "optional" | "ignored" (mergekit's base-model policy)
    base_policy: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]]
    params_type: ClassVar[type]
    #: smallest / largest number of non-base models (None: no limit)
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    #: the engine this method needs (``fastmerge.engine.ENGINES``), None: any tensor-by-tensor engine.
    #: m_ties sets "layerwise": its M-Loss needs forward passes through the merged layers.
    engine: ClassVar[str | None] = None
    #: the fused C++ kernel that runs it (``backends.native``), None: none
    native: ClassVar[NativeKernel | None] = None
    #: the Triton kernels that run it (``backends.triton``, ``engine.gpu``), None: none
    triton: ClassVar[TritonKernel | None] = None
    #: mergekit 0.1.5 appends ``base_model`` to the inputs when it is not listed (its planner's
    #: ``normalize_config``, for methods whose base policy is "ignored"): ``config`` does the same
    base_as_input: ClassVar[bool] = False
    #: ``rank_sweep`` (one output per rank ratio, ``engine.sweep``) is an option of this method
    rank_sweep: ClassVar[bool] = False
    #: ``make_params`` ignores its ``ParamContext`` (no tensor name, no seed): equal settings give one Params for
    #: every tensor, so a plan resolves them once, not once per tensor (a MoE model has 20k-45k tensors, and
    #: resolving each took ~10 us). Methods that key a generator or a selection on the name leave it False.
    tensor_free_params: ClassVar[bool] = False

    def param_specs(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params}

    @abstractmethod
    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> Any:
        """Build the frozen Params from resolved values: per-model lists (one entry per non-base model),
        shared scalars, and the tensor's context (name, seed)."""

    def check(self, params: Any, where: str) -> None:
        """Raise ConfigError for values no backend could merge with (density out of range, ...)."""

    @abstractmethod
    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: Any, compat: bool = False
    ) -> torch.Tensor:
        """The specification. ``compat=False``: fp32 math, result fp32 (the caller rounds once).
        ``compat=True``: mergekit 0.1.5's arithmetic in the inputs' dtype, result in the base's dtype."""


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()
