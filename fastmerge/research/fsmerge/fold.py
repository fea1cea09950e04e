"""Folding a trained SuperNet back into one model of the original size, and saving it.

Column convention (paper Eq. 5): ``W* = M · blockdiag(W¹…Wⁿ) · U``, ``b* = M (b¹‖…‖bⁿ)``. In PyTorch
layout (``nn.Linear`` weights ``[out, in]``, row-vector activations) with per-model blocks ``M_k``
(``y = Σ_k ỹ_k M_k``) and ``U_k`` (``x̃_k = h U_k``):

    W*_pt = Σ_k M_kᵀ W_k U_kᵀ,        b* = Σ_k b_k M_k

computed block by block, never through an ``n·d × n·d`` block-diagonal matrix, in float64 (one rounding
to the models' dtype at the end: the folded model equals the SuperNet's merged stream to fp32 rounding).
Everything else of the architecture (activations, LayerNorms, attention softmax, residual adds) runs in
the merged space inside the SuperNet, so it is copied (learned LayerNorms) or unchanged.

The last unmerge ``U_final`` is not folded into the backbone: task k reads ``g* U_final^{(k)}``, a
``d_out × d_out`` adapter kept with task k's head (``absorb_into_head`` merges it into a linear head).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

Tensor = torch.Tensor


def fold_linear(w: Tensor, b: Tensor | None, m: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Fold one ``U → frozen linear → M`` sandwich (spec §1.1).

    ``w`` ``[n, out, in]`` and ``b`` ``[n, out]`` are the n models' layers; ``m`` ``[n, out, out']`` the
    merge blocks, ``u`` ``[n, in', in]`` the unmerge blocks (None: the input is shared, ``U = (I … I)``).
    Returns ``W*`` ``[out', in']`` and ``b*`` ``[out']`` (None without bias)."""
    w64, m64 = w.double(), m.double()
    if u is None:
        wf = torch.einsum("koa,koi->ai", m64, w64)
    else:
        wf = torch.einsum("koa,koi,kbi->ab", m64, w64, u.double())
    bf = None if b is None else torch.einsum("ko,koa->a", b.double(), m64)
    return wf, bf


def fold_rows(t: Tensor, m: Tensor) -> Tensor:
    """Fold row-vector tables merged by ``M`` (class token, position / word embeddings): ``Σ_k t_k M_k``;
    ``t`` is ``[n, ..., d]``, ``m`` ``[n, d, d']``."""
    return torch.einsum("k...o,koa->...a", t.double(), m.double())


def absorb_into_head(head_w: Tensor, head_b: Tensor | None, unmerge: Tensor) -> tuple[Tensor, Tensor | None]:
    """Head ``H`` (``[c, d]``) reading task features ``g U_k``: ``logits = g U_k Hᵀ + c`` = ``g (H U_kᵀ)ᵀ + c``,
    a head of the same shape; only for plain linear heads (CLIP's normalising heads keep ``U_k`` apart)."""
    return (head_w.double() @ unmerge.double().T).to(head_w.dtype), head_b


@dataclasses.dataclass
class Folded:
    """A folded merge: the backbone in the original layout, and one ``d_out × d_out`` unmerge per task
    (task k's features are ``features(x) @ unmerge[k]``; identity for plain weight merges)."""

    state_dict: dict[str, Tensor]
    unmerge: list[Tensor]
    canonical: dict[str, Tensor]
    dropped: list[str] = dataclasses.field(default_factory=list)

    def task_features(self, feats: Tensor, k: int) -> Tensor:
        """Features of task ``k`` from the folded backbone's features."""
        return feats @ self.unmerge[k].to(feats.dtype)


def to_original_layout(
    spec: Any, canon: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]]
) -> tuple[dict[str, Tensor], list[str]]:
    """``canon`` in the first model's layout, keys in its order, its dtypes. Keys the layout does not know
    (task heads, buffers) are copied when all models agree on them (e.g. constant buffers) and dropped
    (returned) otherwise: heads are per task and never merged."""
    first = models[0]
    known = spec.known_keys(first)
    folded = spec.from_canonical(canon, first)
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for k, v in first.items():
        if k in known:
            out[k] = folded[k]
        elif all(k in m and m[k].shape == v.shape and torch.equal(m[k], v) for m in models[1:]):
            out[k] = v.clone()
        else:
            dropped.append(k)
    return out, dropped


def fold(supernet: Any, models: Sequence[Mapping[str, Tensor]]) -> Folded:
    """Fold ``supernet`` (built from ``models``, state dicts in their original layout) to one model."""
    with torch.no_grad():
        canon = supernet.fold_canonical()
        sd, dropped = to_original_layout(supernet.spec, canon, models)
        unmerge = [u.float() for u in supernet.unmerge_blocks()]
    return Folded(sd, unmerge, {k: v.float() for k, v in canon.items()}, dropped)


def save_folded(folded: Folded, out_dir: str | Path, *, overwrite: bool = False, shard_bytes: int | None = None,
                heads: Sequence[Mapping[str, Tensor]] | None = None, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the folded backbone as (sharded) safetensors in the original layout, plus
    ``fsmerge_tasks.safetensors`` (``task{k}.unmerge`` and, with ``heads`` = per-task ``{"weight", "bias"}``,
    the heads with the unmerge absorbed as ``task{k}.head.weight/bias``) and ``fsmerge.json``."""
    from safetensors.torch import save_file

    from ...io.writer import DEFAULT_SHARD_BYTES, OutTensor, ShardWriter, commit_dir, plan_shards, temp_dir_beside

    out = Path(out_dir)
    items = [(k, v.detach().cpu().contiguous()) for k, v in folded.state_dict.items() if v.is_floating_point()]
    skipped = [k for k, v in folded.state_dict.items() if not v.is_floating_point()]
    plan = plan_shards([OutTensor(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in items],
                       shard_bytes or DEFAULT_SHARD_BYTES)
    tmp = temp_dir_beside(out)
    try:
        writer = ShardWriter(tmp, plan)
        for k, v in items:
            writer.write(k, v)
        writer.finalize()
        tasks: dict[str, Tensor] = {}
        for k, u in enumerate(folded.unmerge):
            tasks[f"task{k}.unmerge"] = u.contiguous()
            if heads is not None:
                hw, hb = absorb_into_head(heads[k]["weight"], heads[k].get("bias"), u)
                tasks[f"task{k}.head.weight"] = hw.contiguous()
                if hb is not None:
                    tasks[f"task{k}.head.bias"] = hb.detach().clone().contiguous()
        save_file(tasks, str(tmp / "fsmerge_tasks.safetensors"))
        info = {"method": "fs-merge", "tasks": len(folded.unmerge), "dropped_keys": folded.dropped,
                "skipped_non_float_keys": skipped, **dict(meta or {})}
        (tmp / "fsmerge.json").write_text(json.dumps(info, indent=2, default=str))
        commit_dir(tmp, out, overwrite)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
