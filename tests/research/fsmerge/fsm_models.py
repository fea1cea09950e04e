"""Tiny random models in their original layouts for the FS-Merge tests (dims of a few units: CI time)."""

from __future__ import annotations

import torch

from fastmerge.research.lab.models import TinyViT


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_sd(seed: int, dims=(10, 16, 12, 9), n_classes: int = 5, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The lab MLP's layout: ``fc1..fcK`` + ``head``, random weights (biases included)."""
    g = gen(seed)
    sd = {}
    for i in range(len(dims) - 1):
        sd[f"fc{i + 1}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g) / dims[i] ** 0.5
        sd[f"fc{i + 1}.bias"] = torch.randn(dims[i + 1], generator=g) * 0.1
    sd["head.weight"] = torch.randn(n_classes, dims[-1], generator=g)
    sd["head.bias"] = torch.randn(n_classes, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def vit_sd(seed: int, dim: int = 12, depth: int = 2, heads: int = 3, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The lab TinyViT (timm layout, 8x8 images, patch 2), every parameter randomised (LayerNorms too,
    so a fold that forgot a learned norm would show)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = TinyViT(image=8, patch=2, dim=dim, depth=depth, heads=heads, mlp_ratio=2.0, n_classes=5)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return {k: v.to(dtype) for k, v in m.state_dict().items()}


def bert_sd(seed: int, dim: int = 12, depth: int = 2, d_ff: int = 20, vocab: int = 23, max_pos: int = 11) -> dict[str, torch.Tensor]:
    """Hugging Face ``BertModel`` keys and shapes, random values."""
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    ln = lambda: 1.0 + r(dim)  # noqa: E731
    sd = {
        "embeddings.word_embeddings.weight": r(vocab, dim),
        "embeddings.position_embeddings.weight": r(max_pos, dim),
        "embeddings.token_type_embeddings.weight": r(2, dim),
        "embeddings.LayerNorm.weight": ln(),
        "embeddings.LayerNorm.bias": r(dim),
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + n + ".weight"] = r(dim, dim)
            sd[p + n + ".bias"] = r(dim)
        sd[p + "attention.output.LayerNorm.weight"] = ln()
        sd[p + "attention.output.LayerNorm.bias"] = r(dim)
        sd[p + "intermediate.dense.weight"] = r(d_ff, dim)
        sd[p + "intermediate.dense.bias"] = r(d_ff)
        sd[p + "output.dense.weight"] = r(dim, d_ff)
        sd[p + "output.dense.bias"] = r(dim)
        sd[p + "output.LayerNorm.weight"] = ln()
        sd[p + "output.LayerNorm.bias"] = r(dim)
    sd["pooler.dense.weight"] = r(dim, dim)
    sd["pooler.dense.bias"] = r(dim)
    return sd


def bert_inputs(seed: int, batch: int = 3, t: int = 7, vocab: int = 23) -> dict[str, torch.Tensor]:
    g = gen(seed)
    ids = torch.randint(0, vocab, (batch, t), generator=g)
    mask = torch.ones(batch, t, dtype=torch.long)
    mask[1, t - 2:] = 0  # padding: masked keys must stay masked in the merged stream
    tt = torch.zeros_like(ids)
    tt[:, t // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random, non-initial values for every learnable parameter (factors and LayerNorms)."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
