"""``fastmerge bench kernels``: every (method, backend, shape, T, dtype) case, timed on this machine.

Inputs per case: base ~ N(0, 0.02²) and T fine-tunes = base + N(0, 0.002²) (never zeros), in ``dtype``,
written before timing (pre-faulted); the output buffer is allocated and written once, then reused. Each
backend runs through the engine's own call, ``fastmerge.backends.BACKENDS[name].run(job, out, inputs,
base, threads)``, with the ``MergeJob`` that ``fastmerge.merge_tensors`` builds; ``torch`` is the
method's ``reference()`` (the specification, fp32 math). ``mergekit`` (when ``import mergekit`` works)
is mergekit's own ``mergekit.merge_methods.api.merge_tensors`` on the same tensors (its arithmetic in the
inputs' dtype, as ``mergekit-yaml`` with ``dtype: bfloat16``).

On a GPU every tensor lives on the device; the Triton backend's ``run`` packs the inputs into one
[T, N] buffer before its kernels and the CUDA backend's copies its result into ``out``: both are in its
time (what the engine pays per tensor is less: it packs on the copy stream).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, Callable, Iterable, Sequence

from ..backends import BACKENDS, PRIORITY
from ..backends.base import MergeJob
from ..methods import REGISTRY, get_method
from ..methods.base import REQUIRED, ParamContext, coerce
from . import bytes as byte_rule
from .roofline import CopyBandwidth, copy_bandwidth, gbps, pct_of_copy
from .timing import CpuTimer, CudaTimer, measure

#: named shape sets (rows x columns of one weight tensor)
PRESETS: dict[str, list[tuple[int, int]]] = {
    # LLaMA-3 8B: attention q/o projection, MLP down projection, embeddings / lm_head (128256 x 4096)
    "llama-8b": [(4096, 4096), (4096, 14336), (128256, 4096)],
    # LLaMA-3 70B: the same tensors at hidden 8192, MLP 28672
    "llama-70b": [(8192, 8192), (8192, 28672), (128256, 8192)],
    # --quick: larger than the L2 of most CPUs, small enough for a 2-core run in seconds
    "quick": [(1024, 2048)],
}
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "f16": "float16",
          "fp32": "float32", "float32": "float32", "f32": "float32"}
#: parameter values of every case (by parameter name: the same for every method that has it); a
#: required parameter without one here gets 0.5. weight: 1/T each.
VALUES = {"density": 0.5, "gamma": 0.01}
MERGEKIT = "mergekit"
BASELINES = ("torch", MERGEKIT)


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    methods: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int], ...] = ()
    models: tuple[int, ...] = ()
    dtypes: tuple[str, ...] = ("bfloat16",)
    repeats: int = 10
    max_seconds: float = 5.0  # per (case, backend): stop repeating after this much timed work (>= 3 runs)
    threads: int = 0
    quick: bool = False
    seed: int = 0


def parse_shapes(spec: str) -> tuple[tuple[int, int], ...]:
    """``llama-8b,4096x14336,...`` -> shapes (presets expanded, duplicates dropped)."""
    out: list[tuple[int, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in PRESETS:
            out += PRESETS[item]
            continue
        try:
            r, c = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: '{item}' is neither a preset ({', '.join(PRESETS)}) nor ROWSxCOLS") from None
        if r <= 0 or c <= 0:
            raise ValueError(f"--shapes: '{item}' has a zero dimension")
        out.append((r, c))
    return tuple(dict.fromkeys(out))


def parse_dtypes(spec: str) -> tuple[str, ...]:
    out = []
    for d in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if d not in DTYPES:
            raise ValueError(f"--dtype: unknown dtype '{d}' (bf16, fp16, fp32)")
        out.append(DTYPES[d])
    return tuple(dict.fromkeys(out))


def has_mergekit() -> bool:
    return importlib.util.find_spec("mergekit") is not None


def default_backends(device: str) -> tuple[str, ...]:
    return (*PRIORITY[device], *((MERGEKIT,) if has_mergekit() else ()))


def bench_params(method: str, T: int, name: str = "model.layers.0.mlp.down_proj.weight", seed: int = 0) -> tuple[Any, dict]:
    """(Params, the values set) of one case: weight 1/T, ``VALUES``, defaults, 0.5 for a required one."""
    m = get_method(method)
    per_model: dict[str, list] = {}
    shared: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for spec in m.params:
        v = 1.0 / T if spec.name == "weight" else VALUES.get(spec.name, spec.default)
        if v is REQUIRED:
            v = 0.5
        if spec.name == "weight" or spec.name in VALUES or spec.default is REQUIRED:
            values[spec.name] = v
        v = coerce(spec, v, f"bench {spec.name}")
        if spec.per_model:
            per_model[spec.name] = [v] * T
        else:
            shared[spec.name] = v
    p = m.make_params(per_model, shared, ParamContext(name, seed))
    m.check(p, "bench")
    return p, values


def make_job(method: str, T: int, numel: int, seed: int = 0) -> MergeJob:
    p, _ = bench_params(method, T, seed=seed)
    return MergeJob("model.layers.0.mlp.down_proj.weight", get_method(method), p, False, numel)


def default_methods(device: str, T: int = 2) -> tuple[str, ...]:
    """Methods a non-reference backend of ``device`` can run, with a bandwidth rule (the fast paths)."""
    out = []
    for name, m in REGISTRY.items():
        if m.max_models == 1 and m.base_policy == "ignored":
            continue  # a copy of its one input (passthrough): the copy bandwidth itself, not a merge kernel
        try:
            job = make_job(name, max(T, m.min_models) if m.max_models is None else m.min_models, 1 << 20)
        except Exception:  # noqa: BLE001 - a method that needs more than parameters (m_ties) is not a kernel
            continue
        if byte_rule.rule(m).passes(job.params) is None:
            continue
        if any(not BACKENDS[b].not_supported_reasons(job, device) for b in PRIORITY[device] if b != "torch"):
            out.append(name)
    return tuple(out)


def models_for(method: str, T: int) -> int:
    """T clamped to what the method takes (slerp, nearswap, passthrough: one model; nuslerp: two)."""
    m = get_method(method)
    T = max(T, m.min_models)
    return min(T, m.max_models) if m.max_models is not None else T


# ------------------------------------------------------------------------------------------------
# one case


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    shape: tuple[int, int]
    models: int
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def key(self) -> str:
        return f"{self.method}-{self.shape[0]}x{self.shape[1]}-T{self.models}-{self.dtype}"


def cases(s: Settings) -> list[Case]:
    out = []
    for shape in s.shapes:
        for dtype in s.dtypes:
            for method in s.methods:
                for T in dict.fromkeys(models_for(method, t) for t in s.models):
                    out.append(Case(method, shape, T, dtype))
    return out


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def needed_bytes(case: Case, itemsize: int, backend: str) -> int:
    """Inputs + output, plus what the backend allocates: the references (torch, mergekit) about 3 fp32 copies
    of every input, the Triton backend a packed copy of the inputs."""
    n = case.numel
    held = (case.models + 2) * n * itemsize
    if backend in BASELINES:
        return held + 3 * (case.models + 1) * n * 4
    return held + ((case.models + 1) * n * 4 if backend == "triton" else 0)


def make_inputs(case: Case, device: str, seed: int = 0):
    """(inputs, base) on ``device``: base ~ N(0, 0.02²), inputs = base + N(0, 0.002²), in the case's dtype."""
    import torch

    dt = getattr(torch, case.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    base32 = torch.randn(case.shape, generator=g, device=device) * 0.02
    xs = [(base32 + 0.002 * torch.randn(case.shape, generator=g, device=device)).to(dt) for _ in range(case.models)]
    return xs, base32.to(dt)


def _mergekit_fn(case: Case, values: dict, inputs, base) -> Callable[[], Any]:
    from mergekit.merge_methods import api as mk_api, get as mk_get

    m = get_method(case.method)
    mk = mk_get(case.method)  # raises for a method mergekit does not have
    tensors = ([base] if m.base_policy != "ignored" else []) + list(inputs)
    base_index = 0 if m.base_policy != "ignored" else None
    return lambda: mk_api.merge_tensors(tensors, mk, parameters=values, base_index=base_index, out_dtype=base.dtype)


def run_case(case: Case, s: Settings, backends: Sequence[str], copy: CopyBandwidth, timer: Callable) -> list[dict]:
    """Every backend on one case: a row each (status "ok", "skipped" with the reason, or "error")."""
    import torch

    m = get_method(case.method)
    params, values = bench_params(case.method, case.models, seed=s.seed)
    job = MergeJob("model.layers.0.mlp.down_proj.weight", m, params, False, case.numel)
    itemsize = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    nbytes = byte_rule.physical_bytes(m, params, case.numel, case.models, itemsize, itemsize, True)
    common = {"method": case.method, "shape": list(case.shape), "models": case.models, "dtype": case.dtype,
              "elements": case.numel, "bytes": nbytes, "passes": byte_rule.rule(m).passes(params),
              "byte_rule": byte_rule.rule(m).words, "params": values}
    rows = []
    avail = _available_bytes(s.device)
    if min(needed_bytes(case, itemsize, b) for b in backends) > 0.8 * avail:
        return [{**common, "backend": b, "status": "skipped", "note": f"needs ~{needed_bytes(case, itemsize, b) / 1e9:.1f} GB "
                 f"of {'GPU ' if s.device == 'cuda' else ''}memory, {avail / 1e9:.1f} GB available"} for b in backends]
    inputs, base = make_inputs(case, s.device, s.seed)
    b_in = base if m.base_policy != "ignored" else None
    out = torch.zeros(case.shape, dtype=base.dtype, device=s.device)  # written: pre-faulted, then reused
    for name in backends:
        row = {**common, "backend": name}
        try:
            need, avail = needed_bytes(case, itemsize, name), _available_bytes(s.device)
            if need > 0.8 * avail:
                raise _Skip(f"needs ~{need / 1e9:.1f} GB of {'GPU ' if s.device == 'cuda' else ''}memory, "
                            f"{avail / 1e9:.1f} GB available")
            if name == MERGEKIT:
                if not has_mergekit():
                    raise _Skip("mergekit is not installed (pip install mergekit)")
                try:
                    fn = _mergekit_fn(case, values, inputs, base)
                except Exception as e:  # noqa: BLE001
                    raise _Skip(f"mergekit cannot run it: {type(e).__name__}: {str(e)[:80]}") from None
            else:
                if name not in BACKENDS:
                    raise _Skip(f"unknown backend (choose from {', '.join([*BACKENDS, MERGEKIT])})")
                if name == "triton" and s.device != "cuda":
                    raise _Skip("Triton kernels run on a GPU (the interpreter is for tests, not timing)")
                why = BACKENDS[name].not_supported_reasons(job, s.device)
                if why:
                    raise _Skip("; ".join(why))
                backend = BACKENDS[name]
                fn = lambda backend=backend: backend.run(job, out, inputs, b_in, s.threads)  # noqa: E731
            budget = s.max_seconds * (0.5 if name in BASELINES else 1.0)
            st = measure(fn, timer, repeats=s.repeats, warmup=1, max_seconds=budget)
            row.update(status="ok", time=st.as_dict())
            if nbytes is not None:
                row["gbps"] = gbps(nbytes, st.median)
                row["pct_of_copy"] = pct_of_copy(row["gbps"], copy.gbps)
        except _Skip as e:
            row.update(status="skipped", note=str(e))
        except Exception as e:  # noqa: BLE001 - one failing backend is a row, not the end of the run
            row.update(status="error", note=f"{type(e).__name__}: {str(e)[:160]}")
        rows.append(row)
    if s.device == "cuda":
        torch.cuda.empty_cache()
    add_speedups(rows)
    return rows


class _Skip(Exception):
    pass


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_torch`` / ``speedup_vs_mergekit`` of every timed row of one case (baseline median / its)."""
    med = {r["backend"]: r["time"]["median_s"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for b in BASELINES:
            if b in med and r["backend"] != b:
                r[f"speedup_vs_{b}"] = med[b] / r["time"]["median_s"]


# ------------------------------------------------------------------------------------------------
# the run


def resolve(device: str = "cpu", methods: str | None = None, backends: str | None = None, shapes: str | None = None,
            models: str | None = None, dtype: str | None = None, quick: bool = False, repeats: int | None = None,
            threads: int = 0, max_seconds: float | None = None) -> Settings:
    """The command line's strings -> Settings, with the defaults of ``device`` and ``quick``."""
    if device not in PRIORITY:
        raise ValueError(f"--device: '{device}' (cpu or cuda)")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no usable CUDA device")
    ms = tuple(x.strip() for x in methods.split(",") if x.strip()) if methods else None
    for x in ms or ():
        get_method(x)  # a ConfigError naming the closest method
    bs = tuple(x.strip() for x in backends.split(",") if x.strip()) if backends else default_backends(device)
    for b in bs:
        if b not in BACKENDS and b != MERGEKIT:
            raise ValueError(f"--backends: unknown backend '{b}' (choose from {', '.join([*BACKENDS, MERGEKIT])})")
    sh = parse_shapes(shapes) if shapes else tuple(PRESETS["quick" if quick else "llama-8b"])
    Ts = tuple(int(t) for t in models.split(",")) if models else ((2,) if quick else ((2, 4, 8) if device == "cuda" else (3,)))
    if any(t < 1 for t in Ts):
        raise ValueError("--models: each T must be >= 1")
    if ms is None:
        ms = default_methods(device)
        if quick:
            # the quick run: the methods with a fused kernel and one pass or two
            ms = tuple(x for x in ms if byte_rule.rule(get_method(x)).passes(bench_params(x, 2)[0]) in (1, 2))[:4]
    return Settings(device=device, methods=ms, backends=bs, shapes=sh, models=Ts,
                    dtypes=parse_dtypes(dtype) if dtype else ("bfloat16",), quick=quick,
                    repeats=repeats or (3 if quick else 10), threads=threads,
                    max_seconds=max_seconds if max_seconds is not None else (0.5 if quick else 5.0))


def run(s: Settings, progress: bool = True, timer: Callable | None = None) -> dict:
    """Run every case of ``s``; the JSON document (``report.SCHEMA``)."""
    import sys

    from .machine import machine_info
    from .report import SCHEMA_VERSION

    timer = timer or (CudaTimer() if s.device == "cuda" else CpuTimer())
    copy = copy_bandwidth(s.device, timer, repeats=5 if s.quick else 10, quick=s.quick)
    all_cases = cases(s)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(all_cases) * len(s.backends), unit="run", desc="fastmerge bench kernels", file=sys.stderr)
    rows: list[dict] = []
    for c in all_cases:
        if bar is not None:
            bar.set_postfix_str(c.key, refresh=True)
        rows += run_case(c, s, s.backends, copy, timer)
        if bar is not None:
            bar.update(len(s.backends))
    if bar is not None:
        bar.close()
    rules = {x: byte_rule.rule(get_method(x)).words for x in s.methods}
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "kernels",
        "command": " ".join(["fastmerge", *sys.argv[1:]]) if os.path.basename(sys.argv[0]) in ("fastmerge", "__main__.py") else None,
        "machine": machine_info(),
        "settings": {"device": s.device, "methods": list(s.methods), "backends": list(s.backends),
                     "shapes": [list(x) for x in s.shapes], "models": list(s.models), "dtypes": list(s.dtypes),
                     "repeats": s.repeats, "max_seconds": s.max_seconds, "threads": s.threads, "quick": s.quick,
                     "timer": getattr(timer, "kind", type(timer).__name__)},
        "byte_rule": byte_rule.SUMMARY,
        "byte_rules": rules,
        "copy": copy.as_dict(),
        "results": rows,
    }


def iter_ok(doc: dict) -> Iterable[dict]:
    return (r for r in doc["results"] if r.get("status") == "ok")
