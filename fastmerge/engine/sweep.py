"""The rank sweep: one input pass, one output model per CART rank ratio (the paper's "bell curve").

Per matrix, the factors are computed once at the largest ratio's rank (randomized or exact, as the
config says) and every output is one reconstruct-and-add from their leading columns, so the sweep
costs one SVD pass. It streams like every engine, inside one ``Session`` with one ``Output`` per ratio:
one tensor group in memory at a time (plus read-ahead), each output written tensor by tensor on the
writer thread, every folder committed at the end, or none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..io.side_files import write_side_files
from .session import Output, Session, peak_rss_mb, torch_threads


@dataclasses.dataclass
class SweepReport:
    """What a rank sweep wrote: one model per rank ratio."""

    outputs: dict[float, str]
    tensors: int
    lowrank_tensors: int
    wall_s: float
    factor_s: float  # time in the SVDs (one pass, at the largest rank)
    reconstruct_s: float  # time forming the outputs (one GEMM per value and matrix)
    peak_rss_mb: float
    engine: str = "sweep"

    def summary(self) -> str:
        outs = ", ".join(f"{k:g}: {v}" for k, v in self.outputs.items())
        return (f"cart rank sweep: {self.tensors} tensors ({self.lowrank_tensors} low-rank) -> {outs}\n"
                f"  {self.wall_s:.2f} s ({self.factor_s:.2f} s SVD, {self.reconstruct_s:.2f} s reconstruct); "
                f"peak RSS {self.peak_rss_mb:.0f} MB")


def sweep_dir_name(ratio: float) -> str:
    return f"rank-{ratio:g}"


def ratios_of(values: Sequence[Any] | None) -> list[float]:
    """The checked rank ratios: numbers in [0, 1], none twice."""
    if not values:
        raise ConfigError("rank_sweep: no rank ratios given (rank_sweep: [0.02, 0.04, 0.08, ...])")
    vals: list[float] = []
    for r in values:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0 or math.isnan(float(r)):
            raise ConfigError(f"rank_sweep: each value must be a number in [0, 1], got {r!r}")
        if float(r) in vals:
            raise ConfigError(f"rank_sweep: value {r} is listed twice")
        vals.append(float(r))
    return vals


def rank_sweep(config: Any, out_dir: str | Path, ratios: Sequence[float] | None = None, **options: Any) -> SweepReport:
    """Merge ``config`` (merge_method: cart) once per rank ratio into ``out_dir/rank-<ratio>/``.

    ``ratios`` defaults to the config's ``rank_sweep`` list; they replace ``rank_ratio`` (``rank`` and
    ``energy`` must be unset). Options as ``fastmerge.merge`` (device, overwrite, seed, threads,
    out_shard_size, copy_tokenizer, progress; mergekit_compat changes nothing for CART)."""
    from ..config import load_config
    from ..plan import build_plan, make_options

    cfg = load_config(config)
    if ratios is not None:
        cfg = dataclasses.replace(cfg, rank_sweep=list(ratios))
    return run(build_plan(cfg, make_options(**options), None), out_dir)


def run(plan: Any, out_dir: str | Path) -> SweepReport:
    """Run a plan whose config has ``rank_sweep``: one input pass, one output folder per ratio."""
    from ..plan import check_output

    t0 = time.perf_counter()
    cfg = plan.config
    if not plan.method.rank_sweep:
        from ..methods import REGISTRY

        able = " or ".join(f"'{n}'" for n, m in REGISTRY.items() if m.rank_sweep)
        raise ConfigError(f"rank_sweep: merge_method must be {able}, got '{plan.method.name}'")
    vals = ratios_of(cfg.rank_sweep)
    for tp in plan.tensors:
        p = tp.params
        if p.rank > 0 or p.energy > 0:
            raise ConfigError(f"rank_sweep: tensor '{tp.name}' has rank={p.rank}, energy={p.energy}; "
                              "the sweep sets the rank from rank_ratio, remove 'rank' / 'energy'")
    out_dir = Path(out_dir)
    roots = [ix.root for ix in plan.indexes.values()]
    outs = {r: out_dir / sweep_dir_name(r) for r in vals}
    for o in outs.values():
        check_output(o, roots, plan.options.overwrite)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)

    def side(r: float) -> Any:
        sub = dataclasses.replace(cfg, parameters={**cfg.parameters, "rank_ratio": r})
        return lambda tmp: write_side_files(plan, tmp, config=sub)

    outputs = [Output(outs[r], plan.shards, side(r)) for r in vals]
    try:
        n_low, factor_s, recon_s = _loop(plan, outputs, vals)
    except BaseException:
        if created:  # the Session left nothing in it: no empty OUT either
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    return SweepReport({r: str(outs[r]) for r in vals}, len(plan.tensors), n_low, time.perf_counter() - t0,
                       factor_s, recon_s, peak_rss_mb())


def _loop(plan: Any, outputs: list[Output], vals: list[float]) -> tuple[int, float, float]:
    """The one input pass: every tensor factored once, reconstructed into each output."""
    from .._lazy import torch, torch_dtype
    from ..methods.cart import lowrank_selected
    from ..ops.randomized_svd import centered_factors, target_rank, weight_average

    factor_s = recon_s = 0.0
    n_low = 0
    device = torch.device(plan.device)
    read_ahead = 2 * max((tp.in_bytes for tp in plan.tensors), default=0)
    with torch_threads(plan.options.threads), \
            Session(plan, outputs, reader=_model_reader(), read_ahead_bytes=read_ahead, sources_only=True,
                    desc="fastmerge cart sweep", progress=(len(plan.tensors), "tensor")) as s:
        for i, tensors in s.prefetch:
            tp = plan.tensors[i]
            p = tp.params
            xs = [x.to(torch_dtype(tp.compute_dtype)) if tp.compute_dtype else x for x in tensors]
            if tp.input_transform is not None:  # tokenizer_source rows / model+lora updates (cart has no base input)
                xs = list(tp.input_transform.apply(xs, plan.options.mergekit_compat))
            if device.type != "cpu":
                xs = [x.to(device, non_blocking=True) for x in xs]
            dt = torch_dtype(tp.out_dtype)
            if lowrank_selected(xs[0], p):
                n_low += 1
                ks = {r: target_rank(xs[0].shape, r, 0) for r in vals}
                ts = time.perf_counter()
                f = centered_factors(xs, max(ks.values()), svd=p.svd, oversample=p.oversample or None,
                                     power_iters=p.power_iters, seed=p.seed)
                factor_s += time.perf_counter() - ts
                ts = time.perf_counter()
                for k, r in enumerate(vals):
                    s.put(tp.name, f.reconstruct(p.lambda_, ks[r]).to("cpu").to(dt), output=k)
                recon_s += time.perf_counter() - ts
                del f
            else:
                avg = weight_average(xs).to("cpu").to(dt)
                for k in range(len(vals)):
                    s.put(tp.name, avg, output=k)
                del avg
            del xs, tensors
            s.prefetch.release(i)
            s.advance(1)
    return n_low, factor_s, recon_s


def _model_reader() -> Any:
    from ..io.reader import ModelReader

    return ModelReader
