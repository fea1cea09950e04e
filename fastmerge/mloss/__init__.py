"""M-Loss (merging-ensembling loss) and M-TIES: how compatible models are for merging, on unlabeled data.

Paper: Wang et al., "M-Loss: Quantifying Model Merging Compatibility with Limited Unlabeled Data",
https://arxiv.org/abs/2602.08564 (definitions: ``fastmerge.mloss.reference``).

    compute_mloss(x, W, b, activation="gelu")          one layer: x [B, d_in], W [q, d_out, d_in] → MLoss
    mloss_from_preacts(h, activation="relu")           from pre-activations h [q, B, d]
    module_mloss(models, batches, targets, ...)        torch modules: shared inputs captured by hooks,
                                                       mode "base" (official code) or "progressive" (paper)
    expected_mloss(act, k, sigma)                      the paper's model: closed forms (``expected``)
    m_ties_tensors / m_ties_modules                    M-TIES (``mties``)
    fastmerge.engine.layerwise.merge_mties(config, out) YAML ``merge_method: m_ties`` on LLaMA checkpoints

Backends of ``compute_mloss``: "triton" (the fused kernel, CUDA; or the interpreter on CPU),
"chunked" (torch over row chunks: bounded memory), "torch" (the eager reference), "auto" (triton on
CUDA tensors when triton is installed, chunked otherwise).
"""

from __future__ import annotations


from typing import Sequence

import torch

from ..errors import ConfigError
from ..kernels import interpreting
from .reference import (
    ACT_CODES, DEFAULT_EPS, STATISTICS, Activation, MLoss, activation, check_alpha, discrepancy, mloss_chunked,
    mloss_from_preacts, mloss_reference, preactivations,
)

from .reference import activation as parse_activation

BACKENDS = ("auto", "triton", "chunked", "torch")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The M-Loss backend that will run on ``device``."""
    if backend not in BACKENDS:
        raise ConfigError(f"M-Loss backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_ok() else "chunked"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        # compiled Triton cannot read host memory (its own error names a pointer, not the remedy)
        raise ConfigError(f"M-Loss backend 'triton' needs CUDA tensors (got {device.type}); "
                          "move them with .cuda(), or use backend='chunked'")
    return backend


def compute_mloss(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    alpha: Sequence[float] | None = None, activation: "str | Activation" = "gelu",
    up_weight: torch.Tensor | None = None, up_bias: torch.Tensor | None = None, eps: float = DEFAULT_EPS,
    backend: str = "auto", chunk_bytes: int = 32 << 20,
) -> MLoss:
    """M-Loss statistics of one layer: shared input x [B, d_in] (tokens flattened into B), stacked source
    weights W [q, d_out, d_in] (+ biases [q, d_out]); gated activations take ``up_weight`` (σ(gate)·up)."""
    from .reference import _check_linear

    act = parse_activation(activation, gated=True if up_weight is not None else None)
    if act.gated and up_weight is None:
        raise ConfigError(f"M-Loss: activation '{activation}' is gated: give up_weight")
    _check_linear(x, weight, bias)
    if up_weight is not None:
        _check_linear(x, up_weight, up_bias, "up_weight")
    al = check_alpha(alpha, weight.shape[0])
    kind = resolve_backend(backend, x.device)
    if kind == "torch":
        return mloss_reference(x, weight, bias, alpha=al, act=act, up_weight=up_weight, up_bias=up_bias, eps=eps)
    if kind == "chunked":
        return mloss_chunked(x, weight, bias, alpha=al, act=act, up_weight=up_weight, up_bias=up_bias, eps=eps,
                             chunk_bytes=chunk_bytes)
    from ..kernels.mloss import fused_mloss

    wdt = weight.dtype
    xk = x.to(wdt) if x.dtype != wdt else x  # one operand dtype for tl.dot
    node, samp = fused_mloss(xk.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), al,
                             act.code, act.slope, None if up_weight is None else up_weight.to(wdt).contiguous(),
                             None if up_bias is None else up_bias.contiguous(), eps)
    return MLoss.from_sums(node, samp[0], samp[1], eps)


def reduce_preacts(
    h: torch.Tensor, *, alpha: Sequence[float] | None = None, activation: "str | Activation" = "gelu",
    up: torch.Tensor | None = None, eps: float = DEFAULT_EPS, backend: str = "auto",
) -> MLoss:
    """M-Loss statistics from pre-activations already in hand, h [q, B, d] (gated: ``up`` [q, B, d])."""
    act = parse_activation(activation, gated=True if up is not None else None)
    al = check_alpha(alpha, h.shape[0])
    kind = resolve_backend(backend, h.device)
    if kind != "triton":
        return mloss_from_preacts(h, al, act, up, eps)
    from ..kernels.mloss import reduce_mloss

    node, samp = reduce_mloss(h, al, act.code, act.slope, up, eps)
    return MLoss.from_sums(node, samp[0], samp[1], eps)


def __getattr__(name: str):
    # the heavier parts load on first use
    lazy = {
        "expected_mloss": ".expected", "monte_carlo_mloss": ".expected", "paper_expected_mloss": ".expected",
        "module_mloss": ".hooks", "capture_inputs": ".hooks", "find_targets": ".hooks", "Target": ".hooks",
        "m_ties_tensors": ".mties", "m_ties_modules": ".mties", "row_keep_ratios": ".mties", "trim_rows": ".mties",
    }
    if name in lazy:
        import importlib

        v = getattr(importlib.import_module(lazy[name], __name__), name)
        globals()[name] = v
        return v
    raise AttributeError(f"module 'fastmerge.mloss' has no attribute {name!r}")


__all__ = [
    "ACT_CODES", "STATISTICS", "DEFAULT_EPS", "Activation", "MLoss", "activation", "compute_mloss", "reduce_preacts",
    "mloss_from_preacts", "mloss_reference", "mloss_chunked", "preactivations", "discrepancy", "resolve_backend",
    "expected_mloss", "monte_carlo_mloss", "paper_expected_mloss", "module_mloss", "capture_inputs", "find_targets",
    "Target", "m_ties_tensors", "m_ties_modules", "row_keep_ratios", "trim_rows",
]
