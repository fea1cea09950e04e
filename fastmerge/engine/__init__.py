"""The engines: what turns a ``MergePlan`` into an output folder, and the one selector between them.

``execute(plan, out)`` runs the first engine in ``ENGINES`` whose ``not_supported_reasons(plan)`` is
empty; ``explain(plan)`` gives every engine's reasons (``fastmerge plan --explain`` prints them). All
of them produce their output through ``session.Session`` (temp dir beside OUT, atomic commit).

| engine | module | runs |
|---|---|---|
| sweep | ``sweep`` | a ``rank_sweep`` config: one input pass, one output model per rank ratio |
| layerwise | ``layerwise`` | methods that need forward passes (``MergeMethod.engine``: m_ties) |
| gpu | ``gpu`` | ``--device cuda``: units, batches, row chunks, streams; runs each tensor's planned backend |
| native | ``stream`` (``RawIO``) | every tensor on the native backend: no torch imported |
| torch | ``stream`` (``TorchIO``) | every other CPU plan |

Importing this package imports no torch (the ``native`` engine never loads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..errors import FastMergeError


class Engine(Protocol):
    name: str

    def not_supported_reasons(self, plan: Any) -> list[str]:
        """Why this engine cannot run ``plan``; [] if it can."""
        ...

    def run(self, plan: Any, out: str | Path) -> Any:
        """Run ``plan`` and produce ``out`` (through a ``Session``); returns the engine's report."""
        ...


def _special(plan: Any, name: str) -> list[str]:
    """Reasons a plan needs an engine other than ``name``: a rank sweep, or a method's own engine."""
    reasons = []
    if plan.config.rank_sweep and name != "sweep":
        reasons.append("rank_sweep writes one model per rank ratio (the sweep engine)")
    need = plan.method.engine
    if need is not None and need != name:
        reasons.append(f"'{plan.method.name}' runs on the {need} engine only")
    if getattr(plan, "fp8", None) is not None and name not in ("native", "torch"):
        reasons += _fp8_reasons(plan, name)
    return reasons


def _fp8_reasons(plan: Any, name: str) -> list[str]:
    """Why an engine other than the CPU streaming ones cannot run a plan with FP8 inputs: the GPU engine
    dequantises them on the device (kernels.fp8) unless they need mergekit_compat's cast, a vocabulary remap
    or a LoRA update on top, or the output is re-quantised to FP8 (all in torch, on the CPU)."""
    if name != "gpu":
        return ["FP8 inputs are dequantised (and FP8 outputs re-quantised) by the CPU streaming and GPU engines only"]
    if plan.fp8.get("quantization_config") is not None:
        return ["FP8 outputs are re-quantised by the CPU streaming engine only"]
    for t in plan.tensors:
        tr = t.input_transform
        if getattr(tr, "before_cast", False) and (t.compute_dtype or tr.then is not None):
            return [f"tensor '{t.name}': FP8 inputs with mergekit_compat's cast, a vocabulary remap or a LoRA update "
                    "are dequantised by the CPU streaming engine only"]
    return []


class _Sweep:
    name = "sweep"

    def not_supported_reasons(self, plan: Any) -> list[str]:
        return _special(plan, self.name) or ([] if plan.config.rank_sweep else ["no rank_sweep in the config"])

    def run(self, plan: Any, out: str | Path) -> Any:
        from . import sweep

        return sweep.run(plan, out)


class _Layerwise:
    name = "layerwise"

    def not_supported_reasons(self, plan: Any) -> list[str]:
        if plan.method.engine != self.name:
            return [f"'{plan.method.name}' merges tensor by tensor (no forward passes)"]
        return _special(plan, self.name)

    def run(self, plan: Any, out: str | Path) -> Any:
        from . import layerwise

        return layerwise.run(plan, out)


class _Gpu:
    name = "gpu"

    def not_supported_reasons(self, plan: Any) -> list[str]:
        return _special(plan, self.name) + ([] if plan.device == "cuda" else [f"device {plan.device}"])

    def run(self, plan: Any, out: str | Path) -> Any:
        from . import gpu

        return gpu.execute_cuda(plan, out, max_gpu_memory=plan.options.max_gpu_memory)


class _Stream:
    def __init__(self, flavour: str):
        self.name = flavour

    def _io(self) -> Any:
        from . import stream

        return stream.RawIO if self.name == "native" else stream.TorchIO

    def not_supported_reasons(self, plan: Any) -> list[str]:
        return _special(plan, self.name) or self._io().not_supported_reasons(plan)

    def run(self, plan: Any, out: str | Path) -> Any:
        from . import stream

        return stream.run(plan, out, self._io())


#: in order of preference: the first with no reasons runs the plan
ENGINES: tuple[Engine, ...] = (_Sweep(), _Layerwise(), _Gpu(), _Stream("native"), _Stream("torch"))


def explain(plan: Any) -> dict[str, list[str]]:
    """Every engine's reasons for not running ``plan`` (empty list: it can), in preference order."""
    return {e.name: e.not_supported_reasons(plan) for e in ENGINES}


def select(plan: Any) -> tuple[Engine, dict[str, list[str]]]:
    """(the engine that runs ``plan``, the reasons of those before it)."""
    skipped: dict[str, list[str]] = {}
    for e in ENGINES:
        why = e.not_supported_reasons(plan)
        if not why:
            return e, skipped
        skipped[e.name] = why
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in skipped.items())
    raise FastMergeError(f"no engine can run this plan ({detail})")


def execute(plan: Any, out: str | Path) -> Any:
    """Run ``plan`` on the first engine that can and write the merged model(s) to ``out``, atomically."""
    engine, _ = select(plan)
    return engine.run(plan, out)


def merge(build: Any, out: str | Path, options: Any) -> Any:
    """``fastmerge.merge``'s engine call: build the plan (``build()``) and run it in this process, or as
    this rank of a ``torchrun`` job, resuming with ``options.resume`` (``distributed.merge``)."""
    from . import distributed

    return distributed.merge(build, out, options, select)


__all__ = ["ENGINES", "Engine", "execute", "explain", "merge", "select"]
