"""A minimal LLaMA-family forward in torch (fp32), one decoder layer at a time, for M-Loss calibration.

Enough of ``LlamaForCausalLM`` (transformers' layout, as ``fastmerge.testing.make_family`` writes it) to
compute each layer's hidden states on a batch of token ids, holding one layer's weights at a time:

    h_0 = embed_tokens[ids]
    per layer: h_mid = h + o_proj(attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = RMSNorm_in(h)
               x     = RMSNorm_post(h_mid)                     (the gated MLP's shared input: M-Loss' x)
               h'    = h_mid + down_proj(silu(gate_proj(x)) · up_proj(x))

Causal softmax attention with grouped-query heads (``num_key_value_heads``), rotary embeddings in the
rotate-half convention (``rope_theta``, default 10000; no RoPE scaling), RMSNorm with ``rms_norm_eps``.
Optional q/k/v biases are used when present. Supported ``architectures``: LlamaForCausalLM,
MistralForCausalLM (no sliding window: calibration sequences are short); others raise ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @staticmethod
    def from_dict(doc: Mapping, where: str = "config.json") -> "LlamaConfig":
        arch = list(doc.get("architectures") or [])
        if not any(a in ARCHITECTURES for a in arch):
            raise ConfigError(f"{where}: m_ties computes M-Loss with a LLaMA-family forward pass; architectures "
                              f"{arch or '(none)'} are not supported (supported: {', '.join(ARCHITECTURES)})")
        if doc.get("rope_scaling"):
            raise ConfigError(f"{where}: rope_scaling is not supported by fastmerge's LLaMA forward")
        act = str(doc.get("hidden_act", "silu"))
        if act not in ("silu", "swish"):
            raise ConfigError(f"{where}: hidden_act '{act}' is not supported (LLaMA's gated MLP uses silu)")
        try:
            heads = int(doc["num_attention_heads"])
            return LlamaConfig(
                hidden=int(doc["hidden_size"]), layers=int(doc["num_hidden_layers"]), heads=heads,
                kv_heads=int(doc.get("num_key_value_heads") or heads), intermediate=int(doc["intermediate_size"]),
                vocab=int(doc["vocab_size"]), rms_eps=float(doc.get("rms_norm_eps", 1e-5)),
                rope_theta=float(doc.get("rope_theta", 10000.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: incomplete LLaMA config ({e})") from None

    @staticmethod
    def from_model_dir(root: str | Path) -> "LlamaConfig":
        p = Path(root) / "config.json"
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: m_ties needs the model's config.json ({e})") from None
        return LlamaConfig.from_dict(doc, str(p))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def rope_tables(cfg: LlamaConfig, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq, head_dim] (fp32) of positions 0..seq−1."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ w.float().T
    return y if b is None else y + b.float()


def attention_residual(
    h: torch.Tensor, w: Mapping[str, torch.Tensor], cfg: LlamaConfig, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """h + self-attention(RMSNorm_in(h)) for h [N, T, hidden] fp32; ``w`` holds the layer's tensors by
    their names relative to the layer ("self_attn.q_proj.weight", "input_layernorm.weight", ...)."""
    N, T, H = h.shape
    n = rms_norm(h, w["input_layernorm.weight"], cfg.rms_eps)
    hd = cfg.head_dim
    q = _lin(n, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")).view(N, T, cfg.heads, hd).transpose(1, 2)
    k = _lin(n, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")).view(N, T, cfg.kv_heads, hd).transpose(1, 2)
    v = _lin(n, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")).view(N, T, cfg.kv_heads, hd).transpose(1, 2)
    cos, sin = rope
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if cfg.kv_heads != cfg.heads:
        rep = cfg.heads // cfg.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v
    o = o.transpose(1, 2).reshape(N, T, cfg.heads * hd)
    return h + _lin(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))


def mlp_input(h_mid: torch.Tensor, w: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> torch.Tensor:
    """RMSNorm_post(h_mid): the input shared by gate_proj and up_proj."""
    return rms_norm(h_mid, w["post_attention_layernorm.weight"], cfg.rms_eps)


def mlp_residual(h_mid: torch.Tensor, x: torch.Tensor, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """h_mid + down_proj(silu(gate_proj(x)) · up_proj(x))."""
    g = _lin(x, w["mlp.gate_proj.weight"])
    u = _lin(x, w["mlp.up_proj.weight"])
    return h_mid + _lin(torch.nn.functional.silu(g) * u, w["mlp.down_proj.weight"])


def decoder_layer(
    h: torch.Tensor, w: Mapping[str, torch.Tensor], cfg: LlamaConfig, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """One LLaMA decoder layer (fp32)."""
    h_mid = attention_residual(h, w, cfg, rope)
    return mlp_residual(h_mid, mlp_input(h_mid, w, cfg), w)


def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[ids].float()


def load_calibration(path: str | Path, vocab: int) -> torch.Tensor:
    """Token ids [N, T] (int64) from a ``.npy`` or ``.pt`` file holding an integer array [N, T] or [T]."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration: {p} is not a file (token ids as .npy or .pt)")
    try:
        if p.suffix == ".npy":
            import numpy as np

            ids = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix in (".pt", ".pth", ".bin"):
            ids = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"calibration: {p}: expected a .npy or .pt file")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"calibration: cannot read {p} ({type(e).__name__}: {e})".split("\n")[0]) from None
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ConfigError(f"calibration: {p} must hold an integer tensor of token ids")
    if ids.dim() == 1:
        ids = ids[None, :]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ConfigError(f"calibration: {p}: token ids must be [N, T] or [T], got shape {list(ids.shape)}")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ConfigError(f"calibration: {p}: token ids must be in [0, {vocab}), found [{lo}, {hi}]")
    return ids
