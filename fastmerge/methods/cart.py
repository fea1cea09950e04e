"""CART: centered task arithmetic with rank-reduced task vectors (weight average + low-rank centered deltas).

Paper: Choi, Kim, Lee, Hong, "Revisiting Weight Averaging for Model Merging", https://arxiv.org/abs/2412.12153

For every selected 2-D weight matrix (attention and MLP projections by default, see ``targets``):

    θ_avg = (1/T)·Σ_t θ_t                          (uniform weight average: no base model, no weights)
    θ*    = θ_avg + λ·Σ_t SVD_k(θ_t − θ_avg)       (paper Eq. 4; a SUM over tasks, not a mean)
    k     = max(1, ⌊rank_ratio·min(m, n)⌋)  |  rank  |  smallest k holding ``energy`` of ‖θ_t − θ_avg‖²_F

Everything else (biases, norms, embeddings, heads, 1-D and >2-D tensors) is the plain weight average.
That is also what the official code gives them: it adds the dense centered deltas back, and
Σ_t (θ_t − θ_avg) = 0. Identities: rank_ratio = 0 gives θ_avg, and so does full rank (any λ).

Choices, with the reasons:

- **Uniform average, no per-model ``weight``.** The paper (Eq. 3, Algorithm 1) and the official code
  (``_get_origin(1/T)``) average uniformly, and the identity Σ_t Δ_t = 0 that makes CART a "centered"
  task arithmetic needs exactly that average. A ``weight`` in a mergekit-style config is therefore
  reported as unused (a warning) and ignored. ``base_model`` is ignored too (not an input).
- **``svd: randomized`` (default) vs ``exact``.** ``exact`` is the specification: one full
  ``torch.linalg.svd`` per matrix per task in fp32, as the official code. ``randomized`` is the fast
  path (``fastmerge.ops.randomized_svd``: sketch with ``oversample`` extra columns, ``power_iters``
  power iterations, centering fused into the sketch, the T·k-inner-dimension
  reconstruction added to θ_avg in one GEMM; fused Triton kernels on CUDA). Because the engine's torch
  backend runs ``reference``, **``reference(compat=False)`` is the fast randomized path when the
  parameter says ``randomized``**; the tests use ``svd: exact`` as the spec and check the randomized
  result against it. The Gaussian sketch is seeded from (run seed, tensor name), so merges repeat.
- **``mergekit_compat``** changes nothing: mergekit 0.1.5 has no CART to reproduce.
- **k**: ⌊·⌋ has a 1e-9 guard (0.29·100 gives 29). ``rank`` > 0 overrides ``rank_ratio``; ``energy``
  > 0 overrides both (randomized: the sketch grows until it holds the share, see ``centered_factors``).
- **``targets``** is one string of comma-separated name substrings (a YAML list would mean a gradient
  over layers): a 2-D tensor is low-rank merged when its name contains one of them and none of the
  ``!``-prefixed exclusions; ``*`` matches every name. ``merge_tensors`` without ``tensor_name``
  treats any 2-D input as selected. ``rank_ratio`` (and every numeric parameter) may be a gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .._lazy import torch

from ..errors import ConfigError
from ..ops.randomized_svd import (
    DEFAULT_POWER_ITERS, centered_factors, energy_rank, target_rank, weight_average,
)
from .base import MergeMethod, ParamContext, ParamSpec, as_fp32

#: Attention and MLP projections across common architectures: LLaMA/Mistral/Qwen (q/k/v/o_proj,
#: gate/up/down_proj), GPT-2 (attn.c_attn, c_proj, mlp.c_fc), open_clip/ViT (attn.in_proj_weight,
#: out_proj, mlp.c_fc — the official code's own filter is "attn" or "mlp"), BERT (query/key/value,
#: dense), OPT/Phi (fc1/fc2), T5 (SelfAttention, EncDecAttention, DenseReluDense), MoE experts.
#: Exclusions keep heads and embeddings averaged even when they contain a target word (lm_head.dense).
DEFAULT_TARGETS = (
    "q_proj,k_proj,v_proj,o_proj,qkv_proj,gate_proj,up_proj,down_proj,gate_up_proj,attn,mlp,c_attn,c_proj,"
    "c_fc,in_proj,out_proj,query,key,value,dense,fc1,fc2,experts,SelfAttention,EncDecAttention,"
    "DenseReluDense,!lm_head,!pooler,!classifier,!embed,!relative_attention_bias"
)


def matches_targets(name: str, targets: str) -> bool:
    """True if ``name`` contains one of the comma-separated substrings and no ``!``-prefixed one."""
    entries = [e.strip() for e in targets.split(",") if e.strip()]
    if any(e.startswith("!") and e[1:] and e[1:] in name for e in entries):
        return False
    return any(not e.startswith("!") and (e == "*" or e in name) for e in entries)


@dataclasses.dataclass(frozen=True)
class CartParams:
    rank_ratio: float = 0.08
    rank: int = 0
    energy: float = 0.0
    lambda_: float = 1.0
    svd: str = "randomized"  # "randomized" | "exact"
    oversample: int = 0  # 0: auto, p = max(10, k)
    power_iters: int = DEFAULT_POWER_ITERS
    targets: str = DEFAULT_TARGETS
    selected: bool = True  # the tensor's name matches ``targets`` (2-D is checked on the data)
    seed: int = 0  # sketch seed of this tensor: (run seed, tensor-name hash)


def rank_for(shape: Sequence[int], p: CartParams) -> int:
    """k of a fixed-rank merge (``energy`` = 0) for a matrix of ``shape``."""
    return target_rank(shape, p.rank_ratio, p.rank)


def lowrank_selected(x: torch.Tensor, p: CartParams) -> bool:
    return p.selected and x.dim() == 2


def exact_cart(xs: Sequence[torch.Tensor], p: CartParams) -> torch.Tensor:
    """The specification, in plain torch (fp32): one full SVD per task, as the official code."""
    avg = weight_average(xs)
    update = torch.zeros_like(avg)
    for x in xs:
        u, s, vh = torch.linalg.svd(as_fp32(x) - avg, full_matrices=False)
        if p.energy > 0:
            k = min(energy_rank(s, float(s.double().square().sum()), p.energy), s.numel())
        else:
            k = rank_for(x.shape, p)
        update += (u[:, :k] * s[:k]) @ vh[:k]
    return avg + p.lambda_ * update


class Cart(MergeMethod):
    name = "cart"
    rank_sweep = True
    paper_url = "https://arxiv.org/abs/2412.12153"
    base_policy = "ignored"
    rank_sweep = True  # one output per rank ratio from one factorization (engine.sweep)
    min_models = 1
    params = (
        ParamSpec("rank_ratio", float, 0.08, per_model=False,
                  doc="k = max(1, floor(rank_ratio*min(m,n))) per matrix; 0 gives the weight average"),
        ParamSpec("rank", int, 0, per_model=False, doc="fixed k per matrix (> 0 overrides rank_ratio)"),
        ParamSpec("energy", float, 0.0, per_model=False,
                  doc="(0, 1]: per task, the smallest k holding this share of ||delta||_F^2 (overrides rank/rank_ratio)"),
        ParamSpec("lambda", float, 1.0, per_model=False, doc="scale of the summed low-rank centered task vectors"),
        ParamSpec("svd", str, "randomized", per_model=False, doc="randomized (fast) or exact (full SVD per task)",
                  choices=("randomized", "exact")),
        ParamSpec("oversample", int, 0, per_model=False, doc="randomized: extra sketch columns p (0: auto, max(10, k))"),
        ParamSpec("power_iters", int, DEFAULT_POWER_ITERS, per_model=False, doc="randomized: power iterations"),
        ParamSpec("targets", str, DEFAULT_TARGETS, per_model=False,
                  doc="comma-separated name substrings of the low-rank merged 2-D tensors; '!x' excludes, '*' all"),
    )
    params_type = CartParams

    def make_params(self, per_model: dict[str, list[Any]], shared: dict[str, Any], ctx: ParamContext) -> CartParams:
        targets = shared["targets"]
        return CartParams(
            rank_ratio=shared["rank_ratio"], rank=shared["rank"], energy=shared["energy"], lambda_=shared["lambda"],
            svd=shared["svd"], oversample=shared["oversample"], power_iters=shared["power_iters"], targets=targets,
            selected=(not ctx.tensor) or matches_targets(ctx.tensor, targets),
            seed=(ctx.seed * 0x9E3779B97F4A7C15 + ctx.key) & 0x7FFF_FFFF_FFFF_FFFF,
        )

    def check(self, params: CartParams, where: str) -> None:
        p = params
        if not 0.0 <= p.rank_ratio <= 1.0:
            raise ConfigError(f"{where}: rank_ratio must be in [0, 1], got {p.rank_ratio}")
        if p.rank < 0:
            raise ConfigError(f"{where}: rank must be >= 0, got {p.rank}")
        if not 0.0 <= p.energy <= 1.0:
            raise ConfigError(f"{where}: energy must be in [0, 1] (0: off), got {p.energy}")
        if p.oversample < 0:
            raise ConfigError(f"{where}: oversample must be >= 0, got {p.oversample}")
        if not 0 <= p.power_iters <= 20:
            raise ConfigError(f"{where}: power_iters must be in [0, 20], got {p.power_iters}")
        if not any(e.strip() and not e.strip().startswith("!") for e in p.targets.split(",")):
            raise ConfigError(f"{where}: targets must name at least one substring (or '*'), got {p.targets!r}")

    def reference(
        self, inputs: Sequence[torch.Tensor], base: torch.Tensor | None, params: CartParams, compat: bool = False
    ) -> torch.Tensor:
        if not lowrank_selected(inputs[0], params):
            return weight_average(inputs)
        if params.svd == "exact":
            return exact_cart(inputs, params)
        f = centered_factors(
            inputs, rank_for(inputs[0].shape, params), svd="randomized", energy=params.energy,
            oversample=params.oversample or None, power_iters=params.power_iters, seed=params.seed,
        )
        return f.reconstruct(params.lambda_)
