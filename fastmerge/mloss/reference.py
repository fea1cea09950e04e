"""M-Loss in plain torch: the specification the fused Triton kernels (``kernels/mloss.py``) are tested against.

Paper: Wang et al., "M-Loss: Quantifying Model Merging Compatibility with Limited Unlabeled Data",
https://arxiv.org/abs/2602.08564 (Definitions 3.3-3.6).

For q source models sharing one layer's input x (a batch of B rows), with pre-activations
h_a = W_a·x + b_a (a = 1..q, each [B, d]) and merging weights α (default 1/q each):

    merged   m = σ(Σ_a α_a h_a)                 (the activation of the parameter average: Σα(W·x+b) = (ΣαW)·x + Σαb)
    ensemble e = Σ_a α_a σ(h_a)                 (the average of the activations)
    D = m − e                                   [B, d], the merging-ensembling discrepancy

Gated MLPs (LLaMA's silu(gate)·up): σ(h) is replaced by σ(g)·u, with g, u the gate and up pre-activations,
m = σ(Σα g)·(Σα u), e = Σ α σ(g_a)·u_a.

Per node j (a hidden unit), averaged over the batch:

    node "abs"   mean_b |D_bj|                              (Def. 3.4)
    node "sq"    mean_b D_bj²                               (the official code's squared variant, M-TIES' input)
    node "norm"  mean_b |D_bj| / (|m_bj| + ε)               (Def. 3.6)

Per layer, averaged over the batch:

    layer        mean_b ‖D_b‖₂                              (Def. 3.3)
    layer_norm   mean_b ‖D_b‖₂ / (‖m_b‖₂ + ε)               (Def. 3.5)

Remark 2 (layer² = Σ_j node²) holds per sample: Σ_j D_bj² = ‖D_b‖₂², hence Σ_j node_sq_j = mean_b ‖D_b‖₂².

Every statistic is kept as a sum over the samples (``MLoss`` adds), so batches can be streamed.
Everything here computes in fp32, whatever the inputs' dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import torch

from ..errors import ConfigError

#: activation name -> code shared with the Triton kernels (``kernels/mloss.py``)
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "quick_gelu": 5, "silu": 6}
_ALIASES = {"linear": "identity", "none": "identity", "swish": "silu", "gelu_exact": "gelu",
            "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quickgelu": "quick_gelu"}
#: mergekit-style names of the node statistic
STATISTICS = ("abs", "sq", "norm")
#: Def. 3.5/3.6: "typically ε = 1e-4 or smaller"
DEFAULT_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation σ, optionally gated (σ(gate)·up). ``slope``: leaky ReLU's negative slope."""

    name: str
    slope: float = 0.01
    gated: bool = False

    @property
    def code(self) -> int:
        return ACT_CODES[self.name]

    def __call__(self, h: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        y = _act(h, self.name, self.slope)
        return y if up is None else y * up


def activation(spec: "str | Activation", slope: float | None = None, gated: bool | None = None) -> Activation:
    """Parse ``"relu"``, ``"leaky_relu(0.2)"``, ``"gelu"``, ``"gelu_tanh"``, ``"quick_gelu"``, ``"silu"``,
    ``"identity"``; ``"gated_silu"`` / ``"gated_<act>"`` is σ(gate)·up (LLaMA: gated_silu)."""
    if isinstance(spec, Activation):
        a = spec
        if slope is not None or gated is not None:
            a = dataclasses.replace(a, slope=a.slope if slope is None else slope, gated=a.gated if gated is None else gated)
        return a
    s = str(spec).strip().lower()
    g = False
    if s.startswith("gated_"):
        g, s = True, s[len("gated_"):]
    m = re.fullmatch(r"([a-z_]+)\s*(?:\(\s*([-+0-9.eE]+)\s*\))?", s)
    if not m:
        raise ConfigError(f"activation: cannot parse {spec!r}")
    name = _ALIASES.get(m.group(1), m.group(1))
    if name not in ACT_CODES:
        raise ConfigError(f"activation: unknown '{spec}' (known: {', '.join(ACT_CODES)}, leaky_relu(a), gated_<act>)")
    sl = float(m.group(2)) if m.group(2) is not None else (0.01 if slope is None else slope)
    if m.group(2) is not None and name != "leaky_relu":
        raise ConfigError(f"activation: only leaky_relu takes a parameter, got {spec!r}")
    return Activation(name, sl, g if gated is None else gated)


def _act(h: torch.Tensor, name: str, slope: float) -> torch.Tensor:
    F = torch.nn.functional
    if name == "identity":
        return h
    if name == "relu":
        return torch.relu(h)
    if name == "leaky_relu":
        return F.leaky_relu(h, slope)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "quick_gelu":  # CLIP's: x·sigmoid(1.702·x)
        return h * torch.sigmoid(1.702 * h)
    if name == "silu":
        return F.silu(h)
    raise ConfigError(f"activation: unknown '{name}'")


@dataclasses.dataclass
class MLoss:
    """M-Loss statistics of one layer as sums over ``samples`` rows (add two to merge batches).

    ``node(...)``/``layer``/... give the batch means."""

    abs_sum: torch.Tensor  # [d] Σ_b |D|
    sq_sum: torch.Tensor  # [d] Σ_b D²
    norm_sum: torch.Tensor  # [d] Σ_b |D| / (|m| + ε)
    layer_sum: float  # Σ_b ‖D_b‖
    layer_norm_sum: float  # Σ_b ‖D_b‖ / (‖m_b‖ + ε)
    samples: int
    eps: float = DEFAULT_EPS

    def __add__(self, other: "MLoss") -> "MLoss":
        if other.eps != self.eps:
            raise ValueError("MLoss: cannot add statistics computed with different eps")
        return MLoss(self.abs_sum + other.abs_sum, self.sq_sum + other.sq_sum, self.norm_sum + other.norm_sum,
                     self.layer_sum + other.layer_sum, self.layer_norm_sum + other.layer_norm_sum,
                     self.samples + other.samples, self.eps)

    def node(self, statistic: str = "abs") -> torch.Tensor:
        """Per-node M-Loss [d], mean over the samples: "abs" (Def. 3.4), "sq" (official), "norm" (Def. 3.6)."""
        s = {"abs": self.abs_sum, "sq": self.sq_sum, "norm": self.norm_sum}.get(statistic)
        if s is None:
            raise ConfigError(f"MLoss.node: statistic must be one of {STATISTICS}, got {statistic!r}")
        return s / max(self.samples, 1)

    @property
    def layer(self) -> float:
        """Layer-level M-Loss, mean over the samples of ‖D_b‖₂ (Def. 3.3)."""
        return self.layer_sum / max(self.samples, 1)

    @property
    def layer_norm(self) -> float:
        """Normalised layer-level M-Loss, mean of ‖D_b‖₂ / (‖m_b‖₂ + ε) (Def. 3.5)."""
        return self.layer_norm_sum / max(self.samples, 1)

    @staticmethod
    def from_sums(node_sums: torch.Tensor, sample_sq: torch.Tensor, sample_act_sq: torch.Tensor, eps: float) -> "MLoss":
        """From the kernels' outputs: node sums [3, d] (|D|, D², normalised) and per-sample Σ_j D², Σ_j m² [B]."""
        norm = sample_sq.double().clamp_min(0).sqrt()
        act = sample_act_sq.double().clamp_min(0).sqrt()
        return MLoss(node_sums[0].float(), node_sums[1].float(), node_sums[2].float(), float(norm.sum()),
                     float((norm / (act + eps)).sum()), int(sample_sq.numel()), eps)


def uniform_alpha(q: int) -> list[float]:
    return [1.0 / q] * q


def check_alpha(alpha: Sequence[float] | None, q: int) -> list[float]:
    """α as floats (default uniform 1/q; Remark 1). Not renormalised: Def. 3.3 takes α as given."""
    if q < 1:
        raise ConfigError("M-Loss needs at least one source model")
    if alpha is None:
        return uniform_alpha(q)
    a = [float(v) for v in (alpha.tolist() if isinstance(alpha, torch.Tensor) else alpha)]
    if len(a) != q:
        raise ConfigError(f"M-Loss: {len(a)} merging weights for {q} models")
    if any(math.isnan(v) for v in a):
        raise ConfigError("M-Loss: merging weights contain NaN")
    return a


def preactivations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """h [q, B, d] (fp32) = x [B, d_in] · W_aᵀ [d_in, d] + b_a for every stacked W [q, d, d_in], b [q, d]."""
    h = torch.matmul(x.float().unsqueeze(0), weight.float().transpose(1, 2))
    if bias is not None:
        h = h + bias.float().unsqueeze(1)
    return h


def discrepancy(
    h: torch.Tensor, alpha: Sequence[float] | None = None, act: "str | Activation" = "gelu",
    up: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, m) [..., d] from pre-activations h [q, ..., d] (and the up pre-activations for gated σ): fp32."""
    a = activation(act, gated=up is not None)
    al = torch.tensor(check_alpha(alpha, h.shape[0]), dtype=torch.float32, device=h.device)
    al = al.reshape((-1,) + (1,) * (h.dim() - 1))
    hf = h.float()
    uf = None if up is None else up.float()
    merged = a((al * hf).sum(0), None if uf is None else (al * uf).sum(0))
    ens = (al * a(hf, uf)).sum(0)
    return merged - ens, merged


def mloss_from_preacts(
    h: torch.Tensor, alpha: Sequence[float] | None = None, act: "str | Activation" = "gelu",
    up: torch.Tensor | None = None, eps: float = DEFAULT_EPS,
) -> MLoss:
    """M-Loss statistics from pre-activations h [q, B, d] (rows = samples; flatten tokens into B first)."""
    if h.dim() != 3:
        raise ConfigError(f"M-Loss: pre-activations must be [q, B, d], got {list(h.shape)}")
    if up is not None and up.shape != h.shape:
        raise ConfigError(f"M-Loss: up pre-activations {list(up.shape)} differ from gate {list(h.shape)}")
    d, m = discrepancy(h, alpha, act, up)
    ad = d.abs()
    row_sq = (d * d).sum(1)
    row_m = (m * m).sum(1)
    return MLoss.from_sums(
        torch.stack([ad.sum(0), (d * d).sum(0), (ad / (m.abs() + eps)).sum(0)]), row_sq, row_m, eps,
    )


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, what: str = "weight") -> None:
    if x.dim() != 2:
        raise ConfigError(f"M-Loss: x must be [B, d_in] (flatten tokens into B), got {list(x.shape)}")
    if weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise ConfigError(f"M-Loss: {what} must be [q, d_out, {x.shape[1]}], got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ConfigError(f"M-Loss: bias of {what} must be {list(weight.shape[:2])}, got {list(bias.shape)}")


def mloss_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, alpha: Sequence[float] | None = None,
    act: "str | Activation" = "gelu", up_weight: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> MLoss:
    """The eager reference: materialise every pre-activation [q, B, d_out] (fp32), then reduce."""
    _check_linear(x, weight, bias)
    if up_weight is not None:
        _check_linear(x, up_weight, up_bias, "up_weight")
    up = None if up_weight is None else preactivations(x, up_weight, up_bias)
    return mloss_from_preacts(preactivations(x, weight, bias), alpha, act, up, eps)


def mloss_chunked(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, alpha: Sequence[float] | None = None,
    act: "str | Activation" = "gelu", up_weight: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS, chunk_bytes: int = 32 << 20,
) -> MLoss:
    """The reference over row chunks: the same sums, peak extra memory ≈ a few × ``chunk_bytes`` (the fp32
    pre-activations of one chunk, [q, rows, d_out]) instead of q·B·d_out·4 bytes. With the issue's shape
    (q=8, d_out=3072) 32 MB is 341 rows per chunk against B = 25,216 (2.5 GB materialised)."""
    _check_linear(x, weight, bias)
    q, d = weight.shape[0], weight.shape[1]
    # upcast the weights once, not per chunk (bf16 LLaMA gate+up of 3 models at 2816×1024: 17M elements)
    weight = weight.float()
    up_weight = None if up_weight is None else up_weight.float()
    per_row = q * d * 4 * (2 if up_weight is not None else 1)
    rows = max(1, chunk_bytes // max(per_row, 1))
    total: MLoss | None = None
    for r0 in range(0, x.shape[0], rows):
        part = mloss_reference(x[r0:r0 + rows], weight, bias, alpha=alpha, act=act, up_weight=up_weight,
                               up_bias=up_bias, eps=eps)
        total = part if total is None else total + part
    if total is None:  # B = 0
        z = torch.zeros(d, device=x.device)
        return MLoss(z, z.clone(), z.clone(), 0.0, 0.0, 0, eps)
    return total
