"""The lab's models: an MLP and a tiny ViT for 8x8 images, each with a separable ``features()`` and ``head``.

Both take images ``[N, 1, 8, 8]`` (the MLP also accepts flattened ``[N, 64]`` rows) and return logits.
``features(x)`` is the penultimate representation (what "Ens Features" averages); ``head`` is the final
``nn.Linear`` (``model.head(model.features(x)) == model(x)``).

Parameter names follow the conventions fastmerge's method filters know: the MLP's hidden layers are
``fc1``, ``fc2``... and the ViT is timm/CLIP-shaped (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``,
``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``norm``, ``head``).

Every model carries its frozen config (``model.config``): ``build(config, seed)`` recreates the same
initial weights, and the checkpoint cache keys on ``config.key()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Union

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """MLP(d_in -> hidden[0] -> ... -> hidden[-1] -> n_classes), ReLU between layers."""

    d_in: int = 64
    hidden: tuple[int, ...] = (128, 128)
    n_classes: int = 10

    def key(self) -> str:
        return json.dumps({"kind": "mlp", **dataclasses.asdict(self)}, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Pre-LN ViT on ``image``x``image`` single-channel images cut in ``patch``x``patch`` patches."""

    image: int = 8
    patch: int = 2
    dim: int = 48
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    n_classes: int = 10

    def key(self) -> str:
        return json.dumps({"kind": "vit", **dataclasses.asdict(self)}, sort_keys=True)


ModelConfig = Union[MLPConfig, ViTConfig]


class MLP(nn.Module):
    """A ReLU MLP with hidden layers ``fc1..fcK`` and a linear ``head``."""

    def __init__(self, d_in: int = 64, hidden: list[int] | tuple[int, ...] = (128, 128), n_classes: int = 10):
        super().__init__()
        self.config = MLPConfig(d_in, tuple(int(h) for h in hidden), n_classes)
        dims = [d_in, *self.config.hidden]
        for i in range(len(self.config.hidden)):
            self.add_module(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.head = nn.Linear(dims[-1], n_classes)

    def hidden_layers(self) -> list[nn.Linear]:
        """The hidden ``nn.Linear`` layers in order (each followed by a ReLU)."""
        return [getattr(self, f"fc{i + 1}") for i in range(len(self.config.hidden))]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, hidden[-1]]`` (after the last ReLU)."""
        h = x.reshape(x.shape[0], -1)
        for fc in self.hidden_layers():
            h = torch.relu(fc(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj`` (timm layout)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, t, d))


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch``x``patch`` patches, each linearly projected to ``dim`` (a stride-p conv as a Linear)."""

    def __init__(self, image: int, patch: int, dim: int):
        super().__init__()
        if image % patch:
            raise ValueError(f"image {image} is not a multiple of patch {patch}")
        self.patch = patch
        self.n = (image // patch) ** 2
        self.proj = nn.Linear(patch * patch, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch
        patches = x.reshape(n, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(n, self.n, p * p)
        return self.proj(patches)


class TinyViT(nn.Module):
    """A timm/CLIP-style ViT: patch embedding, class token, learned position embeddings, pre-LN blocks,
    final LayerNorm; ``features`` is the normalised class token, ``head`` a Linear on it."""

    def __init__(self, image: int = 8, patch: int = 2, dim: int = 48, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 2.0, n_classes: int = 10):
        super().__init__()
        self.config = ViTConfig(image, patch, dim, depth, heads, float(mlp_ratio), n_classes)
        self.patch_embed = PatchEmbed(image, patch, dim)
        # timm initialises both with std 0.02: small next to the unit-scale patch projections
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm class token ``[N, dim]``."""
        if x.dim() == 2:
            side = self.config.image
            x = x.reshape(x.shape[0], 1, side, side)
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(config: ModelConfig, seed: int = 0) -> nn.Module:
    """A fresh model of ``config`` whose initial weights depend only on ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(config, MLPConfig):
            return MLP(config.d_in, config.hidden, config.n_classes)
        if isinstance(config, ViTConfig):
            c = config
            return TinyViT(c.image, c.patch, c.dim, c.depth, c.heads, c.mlp_ratio, c.n_classes)
    raise TypeError(f"unknown model config {type(config).__name__}")


def with_classes(config: ModelConfig, n_classes: int) -> ModelConfig:
    """``config`` with another output size (a pretext head vs a task head)."""
    return dataclasses.replace(config, n_classes=n_classes)
