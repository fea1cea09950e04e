"""Adapter → adapter merging: PEFT's ``LoraModel.add_weighted_adapter`` on adapter files, no model needed
(``fastmerge merge-adapters``, ``fastmerge.lora.merge_adapters``).

For every module some input adapter factors (only the adapters that have it take part, as in PEFT), with
``s_i`` the adapter's PEFT scaling of that module and ``w_i`` its weight:

- ``cat``: A = [w_i·s_i·A_i] stacked, B = [B_i] side by side: exact, rank Σ r_i (zero-padded to PEFT's
  new rank, the sum of the adapters' ``r``, as PEFT does).
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's factor-wise merge (A_i
  weighted by sign·√|w_i·s_i|, B_i by √|w_i·s_i|, the ``merge_utils`` function applied to the A's and to the
  B's separately; all ranks equal). Not the merge of the ΔW's (PEFT's known cross terms), but PEFT's result.
- ``svd``: ΔW = Σ w_i·s_i·B_i·A_i exactly from the factors: QR of [B_1 … B_n] and of [A_1; …; A_n]ᵀ, SVD
  of the small Σr×Σr core, truncated to ``svd_rank`` (default: the largest input ``r``); no dense ΔW.
- ``*_svd`` (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the dense
  ΔW_i (PEFT's ``get_delta_weight``, in the weight's layout), the ``merge_utils`` function, then a rank
  ``svd_rank`` SVD: ``ops.krylov_svd`` by default (block Krylov: within 1.02x of the optimal truncation
  error, ``tests/lora/test_adapters.py``; the exact SVD where a Krylov space would not be smaller than half
  the matrix), ``svd="randomized"`` for the subspace iteration of ``ops.randomized_svd``, ``svd="exact"`` for
  ``torch.linalg.svd`` as PEFT.

The result is written as PEFT would save it: B = U·S, A = Vᵀ (``svd_clamp``: both clamped at that quantile
of their entries), ``r = lora_alpha =`` the new rank (scale 1), every other config field from the first
adapter with ``rank_pattern``/``alpha_pattern`` emptied, ``target_modules`` the union. Two deliberate
differences: ``use_rslora`` is written ``false`` (PEFT keeps the first adapter's, which rescales the merged
adapter by √r); and adapters with whole tensors (``modules_to_save``, saved biases) or ``lora_bias`` are
refused (PEFT cannot combine them either; merge them into the model with ``model+lora``).
DARE types draw their masks with PEFT's ``merge_utils`` rule (``torch.bernoulli`` on torch's global generator,
seeded by ``seed``; modules in the adapter file's order, A before B). They cannot equal one run of PEFT's
``add_weighted_adapter`` bit for bit: PEFT first draws the new adapter's initial weights from that generator.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from .._lazy import torch
from ..errors import CheckpointError, ConfigError, OutputError, ShapeMismatchError
from ..io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, ParsedAdapter, read_tensor
from ..io.outdir import staged
from .merge_utils import FUNCTIONS

#: combination type -> (how: "cat" | "core" (exact SVD from the factors) | "factors" (PEFT's factor-wise merge) |
#: "dense" (ΔW, merge_utils function, SVD), the merge_utils function's arguments: "w" | "density" | "sign")
COMBINATIONS = {
    "svd": ("core", "w"), "linear": ("factors", "w"), "cat": ("cat", "w"), "ties": ("factors", "sign"),
    "ties_svd": ("dense", "sign"), "dare_ties": ("factors", "sign"), "dare_linear": ("factors", "density"),
    "dare_ties_svd": ("dense", "sign"), "dare_linear_svd": ("dense", "density"), "magnitude_prune": ("factors", "density"),
    "magnitude_prune_svd": ("dense", "density"),
}
COMBINATION_TYPES = tuple(COMBINATIONS)
#: the SVDs of the dense ``*_svd`` types (``_lowrank``)
SVD_KINDS = ("krylov", "randomized", "exact")


@dataclasses.dataclass
class AdapterMergeReport:
    out_path: str
    combination_type: str
    modules: int
    rank: int
    wall_s: float

    def summary(self) -> str:
        return (f"merged {self.modules} LoRA modules ({self.combination_type}, r = {self.rank}) -> {self.out_path} "
                f"in {self.wall_s:.2f} s")


def _max_rank(cfg: dict[str, Any]) -> int:
    pat = cfg.get("rank_pattern") or {}
    return max([cfg["r"], *pat.values()])


def svd_from_factors(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank ≤ k with B·A the best rank-k approximation of Σ_i B_i·A_i (weights folded into the
    A_i), B = U·S and A = Vᵀ, from the factors alone: QR of the stacked factors, SVD of the small core."""
    bc = torch.cat([b.float() for b in bs], dim=1)  # (m, R)
    ac = torch.cat([a.float() for a in as_], dim=0)  # (R, n)
    qb, rb = torch.linalg.qr(bc, mode="reduced")
    qa, ra = torch.linalg.qr(ac.T, mode="reduced")
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(k, s.shape[0])
    return (qb @ u[:, :k]) * s[:k], vh[:k] @ qa.T


def _lowrank(delta: torch.Tensor, k: int, svd: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..ops.krylov_svd import krylov_svd
    from ..ops.randomized_svd import randomized_svd

    if svd == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(k, s.shape[0])
        return u[:, :k] @ torch.diag(s[:k]), vh[:k]
    if svd == "randomized":
        u, s, v = randomized_svd(delta, k, seed=seed)
    else:
        u, s, v, _ = krylov_svd(delta, k, seed=seed)
    return u * s, v.T


def _clamp(b: torch.Tensor, a: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), q)
    return b.clamp(-hi, hi), a.clamp(-hi, hi)


def merge_adapters(
    adapters: Sequence[str | Path], weights: Sequence[float], out_path: str | Path, *, combination_type: str = "svd",
    svd_rank: int | None = None, svd_clamp: float | None = None, density: float | None = None,
    majority_sign_method: str = "total", svd: str = "krylov", seed: int | None = None, overwrite: bool = False,
) -> AdapterMergeReport:
    """Combine PEFT LoRA adapters into one, as ``add_weighted_adapter`` (see the module docstring)."""
    t0 = time.perf_counter()
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type: '{combination_type}' is not one of {', '.join(COMBINATION_TYPES)}")
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"give one weight per adapter ({len(adapters)} adapters, {len(weights)} weights)")
    if COMBINATIONS[combination_type][1] != "w" and (density is None or not 0 <= density <= 1):
        raise ConfigError(f"density: combination_type '{combination_type}' needs a density in [0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method: expected 'total' or 'frequency', got {majority_sign_method!r}")
    if svd not in SVD_KINDS:
        raise ConfigError(f"svd: expected one of {', '.join(SVD_KINDS)}, got {svd!r}")
    out = Path(out_path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise OutputError(f"{out}: output exists (pass --overwrite to replace it)")
    parsed = [ParsedAdapter.read(a) for a in adapters]
    carried: dict[str, Any] = {}  # base_layer weights PEFT saves beside embedding LoRAs: the base's own, carried over
    for p in parsed:
        for name, info in p.replaces.items():
            if ".base_layer." in info.name:
                carried.setdefault(info.name, info)
                continue
            raise CheckpointError(f"{p.weights}: tensor '{info.name}' is a whole tensor (modules_to_save or a saved "
                                  "bias): adapter merging combines LoRA factors only (use model+lora)")
        if any("lora_B.bias" in parts for parts in p.factors.values()):
            raise CheckpointError(f"{p.config_path}: lora_bias: adapters with LoRA biases cannot be merged (use model+lora)")
    ctype = "linear" if len(parsed) == 1 else combination_type  # PEFT: one adapter is a linear merge
    how, args = COMBINATIONS[ctype]
    ranks = [_max_rank(p.config) for p in parsed]
    if how == "factors":
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination_type '{ctype}' needs adapters of one rank (r = {ranks}); use 'cat' or 'svd'")
        new_rank = ranks[0]
    elif how == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    fn = FUNCTIONS.get(ctype)
    if seed is not None:
        torch.manual_seed(seed)
    modules: list[str] = []
    for p in parsed:
        modules += [m for m in p.factors if m not in modules]
    result: dict[str, torch.Tensor] = {}
    with staged(out) as tmp:
        for mod in modules:
            ins = []  # (A (r, n), B (m, r), scale, weight, transpose, embedding) of the adapters that factor mod
            for p, w in zip(parsed, weights):
                parts = p.factors.get(mod)
                if parts is None:
                    continue
                emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
                ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
                if ka not in parts or kb not in parts:
                    raise CheckpointError(f"{p.weights}: module '{mod}' lacks '{ka if ka not in parts else kb}'")
                a, b = parts[ka], parts[kb]
                s = p.scale(mod, a, b)
                ins.append((read_tensor(a), read_tensor(b), s, float(w), emb or bool(p.config.get("fan_in_fan_out")), emb))
            shapes = {(x[1].shape[0], x[0].shape[1]) for x in ins}
            if len(shapes) > 1:
                raise ShapeMismatchError(f"module '{mod}': the adapters' B·A shapes differ ({sorted(shapes)}): adapters of "
                                         "different models")
            emb = ins[0][5]
            dtype = ins[0][0].dtype
            ka, kb = (f"{PREFIX}{mod}.lora_embedding_A", f"{PREFIX}{mod}.lora_embedding_B") if emb else (
                f"{PREFIX}{mod}.lora_A.weight", f"{PREFIX}{mod}.lora_B.weight")
            if how == "cat":
                A = torch.cat([a * w * s for a, b, s, w, *_ in ins], dim=0)
                B = torch.cat([b for a, b, *_ in ins], dim=1)
                pa = torch.zeros((new_rank, A.shape[1]), dtype=A.dtype)
                pb = torch.zeros((B.shape[0], new_rank), dtype=B.dtype)
                pa[: A.shape[0]], pb[:, : B.shape[1]] = A, B
                A, B = pa, pb
            elif how == "core":
                B, A = svd_from_factors([b for a, b, *_ in ins], [a.float() * (w * s) for a, b, s, w, *_ in ins], new_rank)
                if svd_clamp is not None:
                    B, A = _clamp(B, A, svd_clamp)
            elif how == "dense":
                deltas = []
                for a, b, s, w, transpose, _ in ins:
                    d = b.float() @ a.float()
                    deltas.append((d.T if transpose else d) * s)  # PEFT's get_delta_weight, in the weight's layout
                ws = torch.tensor([x[3] for x in ins])
                d = fn(deltas, ws, density, majority_sign_method) if args == "sign" else fn(deltas, ws, density)
                if ins[0][4]:
                    d = d.T
                B, A = _lowrank(d.contiguous(), new_rank, svd, seed or 0)
                if svd_clamp is not None:
                    B, A = _clamp(B, A, svd_clamp)
            else:
                ranks_here = {a.shape[0] for a, *_ in ins}
                if len(ranks_here) > 1:
                    raise ConfigError(f"module '{mod}': combination_type '{ctype}' needs one rank, got {sorted(ranks_here)}")
                import math

                wa = torch.tensor([math.sqrt(abs(w * s)) * (1 if w * s >= 0 else -1) for a, b, s, w, *_ in ins])
                wb = torch.tensor([math.sqrt(abs(w * s)) for a, b, s, w, *_ in ins])
                out_ab = []
                for tensors, wv in (([a for a, *_ in ins], wa), ([b for a, b, *_ in ins], wb)):
                    if args == "w":
                        out_ab.append(fn(tensors, wv))
                    elif args == "sign":
                        out_ab.append(fn(tensors, wv, density, majority_sign_method))
                    else:
                        out_ab.append(fn(tensors, wv, density))
                A, B = out_ab
            result[ka] = A.to(dtype).contiguous()
            result[kb] = B.to(dtype).contiguous()
        for name, info in carried.items():
            result[name] = read_tensor(info)
        from safetensors.torch import save_file

        save_file(result, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        cfg = dict(parsed[0].config)
        targets = [p.config.get("target_modules") for p in parsed]
        if all(isinstance(t, str) for t in targets):
            cfg["target_modules"] = "|".join(f"({t})" for t in targets)
        elif all(isinstance(t, list) for t in targets):
            cfg["target_modules"] = sorted(set().union(*targets))
        else:
            raise ConfigError("target_modules: mixing a regex string and a list across adapters is not supported (as PEFT)")
        # the merged adapter is scale 1 everywhere; rank_pattern for modules that end up smaller than new_rank
        small = {m: int(result[f"{PREFIX}{m}.lora_A.weight" if f"{PREFIX}{m}.lora_A.weight" in result
                               else f"{PREFIX}{m}.lora_embedding_A"].shape[0]) for m in modules}
        small = {m: r for m, r in small.items() if r != new_rank}
        cfg.update(r=new_rank, lora_alpha=new_rank, rank_pattern=small, alpha_pattern=dict(small), use_rslora=False)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return AdapterMergeReport(str(out), ctype, len(modules), new_rank, time.perf_counter() - t0)
