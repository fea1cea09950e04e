"""Generate LLaMA-shaped checkpoint families on disk (no downloads): used by the demo, tests and benches.

Tensors are written one at a time with fastmerge's own streaming writer, so generating a multi-GB
family needs no more memory than its largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .io.writer import OutTensor, ShardWriter, plan_shards

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    vocab: int = 2000
    heads: int = 8
    kv_heads: int | None = None
    tie_embeddings: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order transformers saves a LlamaForCausalLM."""
        h, i = self.hidden, self.intermediate
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    @property
    def numel(self) -> int:
        n = 0
        for _, s in self.tensors():
            k = 1
            for d in s:
                k *= d
            n += k
        return n

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads or self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * 0.02


def write_model(
    out: Path, shape: LlamaShape, dtype: str, shard_bytes: int, seed: int, base_seed: int | None = None,
    noise: float = 0.002,
) -> Path:
    """Write one model. With ``base_seed`` it is a "fine-tune": the base (regenerated from ``base_seed``)
    plus N(0, noise²) and, on 1% of entries, larger task-specific changes (so TIES has signal to keep)."""
    out.mkdir(parents=True, exist_ok=True)
    dt = TORCH_DTYPE[dtype]
    specs = shape.tensors()
    shards = plan_shards([OutTensor(n, dtype, s) for n, s in specs], shard_bytes)
    w = ShardWriter(out, shards)
    for k, (name, s) in enumerate(specs):
        g = torch.Generator().manual_seed((base_seed if base_seed is not None else seed) * 100_003 + k)
        t = _base_tensor(name, s, g)
        if base_seed is not None:
            g2 = torch.Generator().manual_seed(seed * 100_003 + k)
            t = t + noise * torch.randn(s, generator=g2)
            spikes = torch.rand(s, generator=g2) < 0.01
            t = t + spikes * (10 * noise) * torch.randn(s, generator=g2)
        w.write(name, t.to(dt).contiguous())
    w.finalize()
    (out / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}))
    return out


def make_family(
    root: Path, shape: LlamaShape = LlamaShape(), n_finetunes: int = 3, dtype: str = "bfloat16",
    shard_bytes: int = 20_000_000, seed: int = 0,
) -> tuple[Path, list[Path]]:
    """base + ``n_finetunes`` fine-tunes under ``root`` (``base/``, ``ft1/``...). Returns (base, fine-tunes)."""
    base = write_model(root / "base", shape, dtype, shard_bytes, seed)
    fts = [
        write_model(root / f"ft{i + 1}", shape, dtype, shard_bytes, seed + i + 1, base_seed=seed)
        for i in range(n_finetunes)
    ]
    return base, fts
