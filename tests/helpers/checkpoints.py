"""Small hand-made checkpoints for I/O tests (the LLaMA families come from fastmerge.testing)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sharded(root: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]]) -> Path:
    """Write ``tensors`` split into the given shards plus model.safetensors.index.json (with safetensors' own writer)."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    wmap = {}
    for i, names in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(root / fn), metadata={"format": "pt"})
        wmap.update({k: fn for k in names})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    return root


def random_state(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(dtype),
        "b.bias": torch.randn(13, generator=g).to(dtype),
        "model.layers.0.w": torch.randn(3, 11, generator=g).to(dtype),
        "model.layers.1.w": torch.randn(3, 11, generator=g).to(dtype),
    }
