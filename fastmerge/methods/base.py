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
from typing import Any, ClassVar, Sequence

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


REQUIRED = object()


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


def round_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (ties to even, as a C cast); ±inf beyond fp32's range."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def coerce(spec: ParamSpec, value: Any, where: str) -> Any:
    """Validate and convert one resolved scalar; errors name ``where`` (model / tensor / field)."""
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
        except ValueError:
            raise ConfigError(f"{where}: parameter '{spec.name}' must be a number, got {value!r}") from None
        if v != v:
            raise ConfigError(f"{where}: parameter '{spec.name}' is NaN")
        return int(v) if spec.kind is int else v
    if spec.kind is str:
        v = str(value)
        if spec.choices and v not in spec.choices:
            raise ConfigError(f"{where}: parameter '{spec.name}' must be one of {list(spec.choices)}, got {v!r}")
        return v
    raise TypeError(spec.kind)


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
