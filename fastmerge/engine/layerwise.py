"""``merge_method: m_ties`` from YAML: M-TIES of LLaMA-family checkpoints, streamed layer by layer.

``fastmerge.merge`` hands an m_ties config here (the M-Loss needs forward passes, which the tensor-by-
tensor runner cannot do). The plan (``fastmerge.plan.build_plan``) still validates everything up front
and resolves every tensor's parameters (weights, densities: scalars, gradients, filters); then:

1. ``model.embed_tokens.weight``: ordinary TIES (through fastmerge's backends), written; the calibration
   tokens' rows of the merged table (``mode: progressive``) or of the base's (``mode: base``) start the
   hidden states h [N, T, hidden].
2. Per decoder layer, one layer of every model is read (memory-mapped views, pages dropped after use):
   attention, norms and ``down_proj`` are ordinary TIES; h goes through the merged attention to the MLP
   input x = RMSNorm_post(h_mid) (``fastmerge.mloss.llama``); each fine-tune's gate/up pre-activations on
   x give the node M-Loss of σ(gate)·up (``fastmerge.mloss.compute_mloss``: fused kernel on CUDA, row
   chunks on CPU), whose rank sets the row keep ratios of ``gate_proj`` and ``up_proj``
   (``fastmerge.mloss.mties``); then h goes through the merged MLP to the next layer. The layer is
   written and released. ``mode: base`` feeds the base model's hidden states instead (official code).
3. The final norm and ``lm_head``: ordinary TIES.

Only the listed ``layers`` (few-layer variant) use M-Loss ratios; forward passes stop after the last of
them. The forward uses the merged weights as written (rounded to the output dtype). Peak memory: one
layer of every model plus the merged layer and fp32 scratch (the embeddings are the largest group),
plus the calibration activations (N·T·hidden fp32 a few times). The output is produced by one
``engine.session.Session`` with this engine's own tensor order (embeddings, layers, the rest) and the
shards laid out from it; the reader thread reads in that order, at most one layer of every model in
flight (held or read ahead). Other architectures raise ConfigError before anything is read.

Backends: the ordinary-TIES tensors are TIES jobs on the backend ``--backend`` asks for (auto: the C++
kernel when built); the M-TIES row trims run on the plan's backend for m_ties (its torch reference).
``report.backends`` counts both by backend name.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import backends
from .._lazy import torch_dtype
from ..backends.base import MergeJob
from ..errors import ConfigError
from ..methods import get_method
from ..methods.ties import TiesParams
from ..plan import TensorPlan, build_plan, layer_index
from ..mloss.llama import (
    LlamaConfig, attention_residual, decoder_layer, load_calibration, mlp_input, mlp_residual, rope_tables,
)
from .session import Output, Session, peak_rss_mb, torch_threads

EMBED = "model.embed_tokens.weight"
LAYER_NAMES = (
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
    "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight",
)
TARGETS = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


@dataclasses.dataclass
class MTiesReport:
    """What an m_ties merge did: sizes, times (forward + M-Loss, merging), memory, per-layer M-Loss."""

    out_dir: str
    tensors: int
    mloss_layers: list[int]
    calibration_tokens: int
    bytes_read: int
    bytes_written: int
    wall_s: float
    forward_s: float  # hidden states through the merged (or base) layers
    mloss_s: float  # node M-Loss of the gated MLPs
    merge_s: float  # TIES / M-TIES of every tensor
    peak_rss_mb: float
    backends: dict[str, int]
    #: layer -> (layer-level M-Loss, normalised layer-level M-Loss) of its gated MLP, mean over tokens
    layer_mloss: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)
    engine: str = "layerwise"

    def summary(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in sorted(self.backends.items()))
        lay = ", ".join(f"{i}: {v[0]:.3g}" for i, v in sorted(self.layer_mloss.items()))
        return (
            f"m_ties: merged {self.tensors} tensors -> {self.out_dir}\n"
            f"  M-Loss ratios on layers {self.mloss_layers or 'none'} from {self.calibration_tokens} calibration tokens\n"
            f"  read {self.bytes_read / 1e6:.1f} MB, wrote {self.bytes_written / 1e6:.1f} MB in {self.wall_s:.2f} s "
            f"({self.forward_s:.2f} s forward, {self.mloss_s:.2f} s M-Loss, {self.merge_s:.2f} s merging)\n"
            f"  peak RSS {self.peak_rss_mb:.0f} MB; tensors per backend: {per}"
            + (f"\n  layer M-Loss: {lay}" if lay else "")
        )


def parse_layers(value: Any, n_layers: int, where: str = "parameters.layers") -> list[int]:
    """The few-layer variant's layers: None / "" / [] = all; a list of ints, an int, or "0,8-10"."""
    if value is None or value == "" or value == []:
        return list(range(n_layers))
    items: list[int] = []
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected layer indices, got {value!r}")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{where}: layer indices must be integers, got {v!r}")
            items.append(v)
    elif isinstance(value, str):
        for part in value.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ConfigError(f"{where}: cannot parse {value!r} (use e.g. '8-10' or '0,8,9,10')")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ConfigError(f"{where}: empty range '{part}'")
            items += list(range(lo, hi + 1))
    else:
        raise ConfigError(f"{where}: expected a list of layer indices or a string like '8-10', got {value!r}")
    bad = [i for i in items if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"{where}: layer {bad[0]} does not exist (the model has {n_layers} layers)")
    return sorted(set(items))


def _calibration_path(cfg: Any) -> Path:
    raw = cfg.parameters.get("calibration")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{cfg.source or 'config'}: m_ties needs parameters.calibration: a .npy / .pt file of token ids")
    p = Path(raw)
    if not p.exists() and not p.is_absolute() and cfg.source:
        beside = Path(cfg.source).parent / p
        if beside.exists():
            return beside
    return p


def _shared_param(cfg: Any, name: str, default: str, choices: tuple[str, ...]) -> str:
    v = cfg.parameters.get(name, default)
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(f"{cfg.source or 'config'}: parameters.{name} must be one of {list(choices)}, got {v!r}")
    return v


def merge_mties(config: Any, out_dir: str | Path, **options: Any) -> MTiesReport:
    """Merge an m_ties config (LLaMA-family checkpoints) into ``out_dir``; options as ``fastmerge.merge``
    (device, backend, threads, overwrite, out_shard_size, copy_tokenizer, progress; ``mergekit_compat``
    changes nothing: m_ties is not a mergekit method)."""
    from ..config import load_config
    from ..plan import make_options

    cfg = load_config(config)
    if cfg.method.engine != "layerwise":
        raise ConfigError(f"merge_mties: '{cfg.merge_method}' does not merge layer by layer (use merge_method: m_ties)")
    return run(build_plan(cfg, make_options(**options), out_dir), out_dir)


def run(plan: Any, out_dir: str | Path) -> MTiesReport:
    """Run an m_ties plan layer by layer into ``out_dir``."""
    t0 = time.perf_counter()
    cfg = plan.config
    if cfg.slices is not None:
        raise ConfigError(f"{cfg.source or 'config'}: m_ties merges whole models: use 'models', not 'slices'")
    lcfg = LlamaConfig.from_model_dir(plan.ref_root)
    mode = _shared_param(cfg, "mode", "progressive", ("progressive", "base"))
    statistic = _shared_param(cfg, "statistic", "sq", ("sq", "abs", "norm"))
    layers = parse_layers(cfg.parameters.get("layers"), lcfg.layers)
    ids = load_calibration(_calibration_path(cfg), lcfg.vocab)
    with torch_threads(plan.options.threads):
        return _run(plan, lcfg, mode, statistic, layers, ids, Path(out_dir), t0)


def _ties_params(p: Any) -> TiesParams:
    return TiesParams(weight=p.weight, density=p.density, normalize=p.normalize, lambda_=p.lambda_,
                      election=p.election, selection=p.selection, rescale=p.rescale)


def _layout(plan: Any, lcfg: LlamaConfig) -> tuple[list[list[TensorPlan]], list[TensorPlan]]:
    """(the tensors of each decoder layer, the tensors after them), checked against the LLaMA layout."""
    tr = next((tp.input_transform for tp in plan.tensors if getattr(tp, "input_transform", None) is not None), None)
    if tr is not None:
        what = getattr(tr, "describe", "tokenizer_source (vocabulary remapping)")
        raise ConfigError(f"m_ties: {what} is not supported with m_ties yet")
    if not any(tp.name == EMBED for tp in plan.tensors):
        raise ConfigError(f"{plan.ref_root}: m_ties needs '{EMBED}' (a LLaMA-family checkpoint)")
    per_layer: list[list[TensorPlan]] = [[] for _ in range(lcfg.layers)]
    post: list[TensorPlan] = []
    for tp in plan.tensors:
        li = layer_index(tp.name)
        if tp.name == EMBED:
            continue
        if li is None:
            post.append(tp)
        elif li < lcfg.layers:
            per_layer[li].append(tp)
        else:
            raise ConfigError(f"{plan.ref_root}: tensor '{tp.name}' beyond num_hidden_layers={lcfg.layers}")
    for i, group in enumerate(per_layer):
        have = {tp.name[len(f"model.layers.{i}."):] for tp in group}
        missing = [n for n in LAYER_NAMES if n not in have]
        if missing:
            raise ConfigError(f"{plan.ref_root}: layer {i} has no '{missing[0]}' (not a LLaMA-family layout)")
    return per_layer, post


def _run(plan: Any, lcfg: LlamaConfig, mode: str, statistic: str, layers: list[int], ids: torch.Tensor,
         out: Path, t0: float) -> MTiesReport:
    from ..io.reader import ModelReader
    from ..io.writer import plan_shards
    from ..mloss import compute_mloss

    per_layer, post = _layout(plan, lcfg)
    index = {tp.name: i for i, tp in enumerate(plan.tensors)}
    order = [index[EMBED]] + [index[tp.name] for g in per_layer for tp in g] + [index[tp.name] for tp in post]
    shards = plan_shards([plan.tensors[i].out_tensor for i in order], plan.options.out_shard_size)
    # read-ahead of one layer of every model (the largest): the loop holds a whole layer until it is
    # written, and the reader thread fills what it releases; the embeddings (one larger group) come alone
    layer_bytes = max((sum(tp.in_bytes for tp in g) for g in per_layer), default=0)
    device = torch.device(plan.device)
    ties = get_method("ties")
    counts: dict[str, int] = {}
    times = {"forward": 0.0, "mloss": 0.0, "merge": 0.0}
    layer_mloss: dict[int, tuple[float, float]] = {}
    bytes_read = 0
    last = max(layers) if layers else -1
    rope = rope_tables(lcfg, ids.shape[1])
    rope = (rope[0].to(device), rope[1].to(device))

    def run_on(backend: str, job: MergeJob, tp: TensorPlan, b: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        ts = time.perf_counter()
        res = torch.empty(tp.shape, dtype=torch_dtype(tp.out_dtype))
        backends.BACKENDS[backend].run(job, res, xs, b, plan.options.threads)
        counts[backend] = counts.get(backend, 0) + 1
        times["merge"] += time.perf_counter() - ts
        return res

    def plain(tp: TensorPlan, b: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        """Ordinary TIES of one tensor, in the output dtype, on the backend ``--backend`` asks for (auto:
        the C++ kernel when built). Not ``tp.backend``: the plan chose that for the m_ties job, which
        only the torch reference runs; these tensors are TIES jobs."""
        job = MergeJob(tp.name, ties, _ties_params(tp.params), False)
        name, _ = backends.select(job, "cpu", plan.options.backend)
        return run_on(name, job, tp, b, xs)

    def trimmed(tp: TensorPlan, b: torch.Tensor, xs: list[torch.Tensor], row_loss: torch.Tensor) -> torch.Tensor:
        """M-TIES of a target matrix (per-row trim by ``row_loss``) on the plan's backend for it."""
        params = dataclasses.replace(tp.params, row_loss=tuple(row_loss.tolist()))
        return run_on(tp.backend, MergeJob(tp.name, plan.method, params, False), tp, b, xs)

    def on_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device).float()

    with Session(plan, [Output(out, shards)], reader=ModelReader, order=order, read_ahead_bytes=layer_bytes,
                 desc="fastmerge m_ties", progress=(lcfg.layers + 2, "layer")) as s:
        groups = iter(s.prefetch)

        def load(tp: TensorPlan) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
            """(plan index, base, sources) of the next tensor in ``order``, which must be ``tp``."""
            nonlocal bytes_read
            i, tensors = next(groups)
            assert plan.tensors[i].name == tp.name, (plan.tensors[i].name, tp.name)
            bytes_read += tp.in_bytes
            return i, tensors[0], tensors[1:]

        # 1. embeddings
        tp = plan.tensors[order[0]]
        k, b, xs = load(tp)
        merged = plain(tp, b, xs)
        s.put(tp.name, merged)
        h = None
        if last >= 0:
            ts = time.perf_counter()
            table = merged if mode == "progressive" else b
            h = table[ids].to(device).float()
            del table
            times["forward"] += time.perf_counter() - ts
        del merged, b, xs
        s.prefetch.release(k)
        s.advance(1)
        # 2. decoder layers
        for i, group in enumerate(per_layer):
            pre = f"model.layers.{i}."
            loaded = {tp.name[len(pre):]: (tp, *load(tp)) for tp in group}
            res: dict[str, torch.Tensor] = {}
            for rel, (tp, _, b, xs) in loaded.items():
                if rel not in TARGETS or i not in layers:
                    res[rel] = plain(tp, b, xs)
            if i <= last:
                ts = time.perf_counter()
                src = ({rel: on_dev(v) for rel, v in res.items()} if mode == "progressive"
                       else {rel: on_dev(v[2]) for rel, v in loaded.items()})
                h_mid = attention_residual(h, src, lcfg, rope)
                x = mlp_input(h_mid, src, lcfg)
                times["forward"] += time.perf_counter() - ts
            if i in layers:
                ts = time.perf_counter()
                gtp, _, _, gxs = loaded["mlp.gate_proj.weight"]
                _, _, _, uxs = loaded["mlp.up_proj.weight"]
                w = list(gtp.params.weight)
                sw = sum(w)
                alpha = [v / sw for v in w] if sw != 0 else None
                stats = compute_mloss(
                    x.reshape(-1, lcfg.hidden), torch.stack([t.to(device) for t in gxs]), None, alpha=alpha,
                    activation="gated_silu", up_weight=torch.stack([t.to(device) for t in uxs]),
                )
                row_loss = stats.node(statistic).double().cpu()
                layer_mloss[i] = (stats.layer, stats.layer_norm)
                times["mloss"] += time.perf_counter() - ts
                for rel in TARGETS:
                    tp, _, b, xs = loaded[rel]
                    res[rel] = trimmed(tp, b, xs, row_loss)
            if i < last:
                ts = time.perf_counter()
                if mode == "progressive":
                    src.update({rel: on_dev(res[rel]) for rel in TARGETS})
                h = mlp_residual(h_mid, x, src)
                del src, h_mid, x
                times["forward"] += time.perf_counter() - ts
            elif i == last:
                h = None  # no later layer needs hidden states
                del src, h_mid, x
            for tp in group:
                s.put(tp.name, res[tp.name[len(pre):]])
            for _, k, _, _ in loaded.values():
                s.prefetch.release(k)
            del loaded, res
            s.advance(1)
        # 3. final norm, lm_head
        for tp in post:
            k, b, xs = load(tp)
            s.put(tp.name, plain(tp, b, xs))
            del b, xs
            s.prefetch.release(k)
        s.advance(1)
    return MTiesReport(
        out_dir=str(out), tensors=len(order), mloss_layers=layers, calibration_tokens=int(ids.numel()),
        bytes_read=bytes_read, bytes_written=s.bytes_written, wall_s=time.perf_counter() - t0,
        forward_s=times["forward"], mloss_s=times["mloss"], merge_s=times["merge"], peak_rss_mb=peak_rss_mb(),
        backends=counts, layer_mloss=layer_mloss,
    )


def decoder_forward(ids: torch.Tensor, state: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> torch.Tensor:
    """Hidden states after every decoder layer of a whole in-memory state dict (tests, small models)."""
    from ..mloss.llama import embed

    h = embed(ids, state[EMBED])
    rope = rope_tables(cfg, ids.shape[1])
    for i in range(cfg.layers):
        pre = f"model.layers.{i}."
        h = decoder_layer(h, {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}, cfg, rope)
    return h
