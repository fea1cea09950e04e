"""Foldable SuperNets: n frozen models, a learned merge (M) after and unmerge (U) before every linear layer.

Paper: E. Kinderman, I. Hubara, H. Maron, D. Soudry, "Foldable SuperNets: Scalable Merging of
Transformers with Different Initializations and Tasks", https://arxiv.org/abs/2410.01483

    x̃ = h U  (merged width d -> n blocks of d: each model's reconstructed input)
    ỹ_k = x̃_k W_kᵀ + b_k                (model k's frozen layer)
    y  = Σ_k ỹ_k M_k                     (n blocks -> merged width d)

Activations, LayerNorms (learned), attention softmax and residual adds run in the merged d-dim stream,
so every M/U sits next to a frozen linear and folds into it (``fold.py``): the merged model has the
original architecture and size. The last unmerge ``U_final`` maps the merged features to one block per
task (``n_out``, = n unless the sequential variant says otherwise) and is kept with the task heads.

M and U are *factors*, never dense ``n·d × d`` parameters (spec §2.5, Eq. 7): per-model diagonals plus a
rank-r term, ``M = [diag(m¹); …; diag(mⁿ)] + A·B``. Applied as ``Σ_k x_k ⊙ m^k + (x A) B`` they cost
O(n·T·d·r) instead of the official code's O(n·T·d²) dense product per call (spec §6.2), so a SuperNet
step costs ~n× one model's linear layers. Only tiny layers (d ≤ ``DENSE_APPLY_MAX_D`` = 128, where
per-op overhead dominates) apply the blocks built from the factors as one GEMM. Hidden-side (d_ff) factors get rank ``r·d_ff/d`` (the
official code's choice; it reproduces the paper's parameter counts, 60.03M for 4× ViT-B-16 at r = 32).
``rank="full"`` stores dense per-model blocks instead (the paper's MLP experiments, width 128).

Learnable: the factors and the LayerNorm affine parameters. The models' weights are buffers.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .arch import BertSpec, MLPSpec, Spec, ViTSpec, act_fn, check_same_shapes, mha, patchify
from .fold import fold_linear, fold_rows

Tensor = torch.Tensor
Rank = Union[int, str]

#: Up to this width a diagonal + low-rank factor is applied through its (differentiable) dense blocks:
#: per-op overhead dominates tiny layers, and one GEMM beat the 5-op factor path by 1.5-1.9x at d = 48
#: (r = 4, 12; 2176 tokens) and 1.15x at d = 96; at d = 768 the factor path is 3-6x faster (measured, one
#: thread). The parameters (and counts) are the factors either way; only the order of operations differs.
DENSE_APPLY_MAX_D = 128

_QKV = re.compile(r"b(\d+)\.([qkv])\.([wb])")


class Factor(nn.Module):
    """A merge (``kind="merge"``: n blocks of width d -> d) or unmerge (``"unmerge"``: d -> n blocks) map.

    ``rank`` = r ≥ 0: per-model diagonals (``diag`` ``[n, d]``) plus a rank-r term (merge: ``a`` ``[n, d, r]``
    = A ∈ R^{n·d×r}, ``b`` ``[r, d]``; unmerge: ``a`` ``[d, r]``, ``b`` ``[r, n, d]``); r = 0 is
    "FS-Merge diagonal". ``rank="full"``: dense blocks ``full`` ``[n, d, d]``. Values are set by ``init.py``
    (all zero after construction)."""

    def __init__(self, kind: str, n: int, d: int, rank: Rank, device: torch.device | str | None = None):
        super().__init__()
        if kind not in ("merge", "unmerge"):
            raise ValueError(f"factor kind must be 'merge' or 'unmerge', got {kind!r}")
        if rank != "full" and (not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be an integer >= 0 or 'full', got {rank!r}")
        self.kind, self.n, self.d, self.rank = kind, n, d, rank
        z = lambda *s: nn.Parameter(torch.zeros(*s, device=device))  # noqa: E731
        if rank == "full":
            self.full = z(n, d, d)
        else:
            self.diag = z(n, d)
            if rank > 0:
                self.a = z(n, d, rank) if kind == "merge" else z(d, rank)
                self.b = z(rank, d) if kind == "merge" else z(rank, n, d)

    def extra_repr(self) -> str:
        return f"{self.kind}, n={self.n}, d={self.d}, rank={self.rank}"

    def forward(self, x: Tensor) -> Tensor:
        """merge: ``[..., n, d]`` -> ``[..., d]``; unmerge: ``[..., d]`` -> ``[..., n, d]``."""
        n, d = self.n, self.d
        if self.rank == "full" or d <= DENSE_APPLY_MAX_D:
            w = self._dense()
            if self.kind == "merge":
                # Σ_k x_k B_k = (x_1‖…‖x_n) · [B_1; …; B_n]: one GEMM
                return x.flatten(-2) @ w.reshape(n * d, d)
            return (x @ w.permute(1, 0, 2).reshape(d, n * d)).unflatten(-1, (n, d))
        if self.kind == "merge":
            y = (x * self.diag).sum(-2)
            if self.rank:
                y = y + (x.flatten(-2) @ self.a.reshape(n * d, self.rank)) @ self.b
            return y
        y = x.unsqueeze(-2) * self.diag
        if self.rank:
            y = y + ((x @ self.a) @ self.b.reshape(self.rank, n * d)).unflatten(-1, (n, d))
        return y

    def _dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The blocks ``[n, d, d]`` as a differentiable function of the factors (in ``dtype``, default theirs)."""
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        if self.rank == "full":
            return cast(self.full)
        out = torch.diag_embed(cast(self.diag))
        if self.rank:
            a, b = cast(self.a), cast(self.b)
            out = out + (a @ b if self.kind == "merge" else torch.einsum("dr,rke->kde", a, b))
        return out

    def blocks(self) -> Tensor:
        """The dense per-model blocks ``[n, d, d]`` in float64 (for the fold): merge ``y = Σ_k x_k B_k``;
        unmerge ``x̃_k = h B_k``."""
        return self._dense(torch.float64)

    def n_params(self) -> int:
        """Learnable parameters of this factor."""
        return sum(p.numel() for p in self.parameters())


class LearnedNorm(nn.Module):
    """A LayerNorm in the merged stream with learned affine parameters (spec §2.3)."""

    def __init__(self, d: int, eps: float, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device))
        self.bias = nn.Parameter(torch.zeros(d, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def _slin(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """n frozen linears on per-model inputs: ``[..., n, in]`` x ``[n, out, in]`` -> ``[..., n, out]``."""
    y = torch.einsum("...ni,noi->...no", x, w)
    return y if b is None else y + b


def _shared(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """n frozen linears on one shared input: ``[..., in]`` -> ``[..., n, out]`` (one GEMM)."""
    n, o, i = w.shape
    y = (x @ w.reshape(n * o, i).T).unflatten(-1, (n, o))
    return y if b is None else y + b


def scaled_rank(rank: Rank, d: int, d_model: int) -> Rank:
    """Rank of a factor of width d in a model of width d_model: ``r·d/d_model`` (at least 1 if r > 0)."""
    if rank == "full" or rank == 0 or d == d_model:
        return rank
    return max(1, round(rank * d / d_model))


class SuperNet(nn.Module):
    """Common part: frozen stacked weights (buffers), factors, learned norms, fold bookkeeping."""

    spec: Spec

    def __init__(self, spec: Spec, canons: Sequence[Mapping[str, Tensor]], n_out: int | None):
        super().__init__()
        check_same_shapes(canons)
        self.spec = spec
        self.n = len(canons)
        self.n_out = self.n if n_out is None else n_out
        self.names = sorted(canons[0])
        self.factors = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        for k in self.names:
            self.register_buffer(self._buf(k), torch.stack([c[k].detach().float() for c in canons]), persistent=False)

    @staticmethod
    def _buf(name: str) -> str:
        return "frozen_" + name.replace(".", "__")

    def w(self, name: str) -> Tensor | None:
        """Stacked frozen tensor ``[n, ...]`` of canonical ``name`` (None if absent)."""
        m = _QKV.fullmatch(name)
        if m is not None and hasattr(self, f"qkv_{m[3]}{m[1]}"):
            t = getattr(self, f"qkv_{m[3]}{m[1]}")
            d = t.shape[1] // 3
            j = "qkv".index(m[2])
            return t[:, j * d:(j + 1) * d]
        return getattr(self, self._buf(name), None)

    def _fuse_qkv(self, depth: int) -> None:
        """Q, K and V share one unmerge: store their weights once as ``[n, 3d, ...]`` (``qkv_w{i}``,
        ``qkv_b{i}``) so one einsum serves all three; ``w("b{i}.q.w")`` returns a view."""
        for i in range(depth):
            for suf in ("w", "b"):
                parts = [self.w(f"b{i}.{x}.{suf}") for x in "qkv"]
                if parts[0] is None:
                    continue
                fused = torch.cat(parts, dim=1)
                for x in "qkv":
                    delattr(self, self._buf(f"b{i}.{x}.{suf}"))
                self.register_buffer(f"qkv_{suf}{i}", fused, persistent=False)

    def qkv(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Block i's fused ``[n, 3d, d]`` Q/K/V weights and ``[n, 3d]`` biases (None without bias)."""
        return getattr(self, f"qkv_w{i}"), getattr(self, f"qkv_b{i}", None)

    def _factor(self, key: str, kind: str, d: int, rank: Rank, n: int | None = None) -> None:
        self.factors[key] = Factor(kind, self.n if n is None else n, d, rank, device=self._device())

    def _norm(self, key: str, d: int, eps: float) -> None:
        self.norms[key] = LearnedNorm(d, eps, device=self._device())

    def _device(self) -> torch.device:
        return self.w(self.names[0]).device

    def f(self, key: str) -> Factor:
        """The factor called ``key``."""
        return self.factors[key]  # type: ignore[return-value]

    def norm_canonical(self) -> dict[str, str]:
        """norm module key -> canonical LayerNorm name (``b0_ln1`` -> ``b0.ln1``)."""
        return {k: k.replace("_", ".", 1) if k.startswith("b") and k[1].isdigit() else k for k in self.norms}

    def learnable(self) -> list[nn.Parameter]:
        """What trains: the factors and the learned LayerNorms (the models' weights are buffers)."""
        return list(self.parameters())

    def n_learnable(self) -> int:
        """Number of learnable parameters (the spec's counts, §2.5)."""
        return sum(p.numel() for p in self.parameters())

    def n_frozen(self) -> int:
        """Number of frozen model weights held (n copies of the backbone)."""
        return sum(b.numel() for b in self.buffers())

    def unmerge_blocks(self) -> Tensor:
        """``U_final``'s per-task blocks ``[n_out, d_out, d_out]`` (task k reads ``g @ blocks[k]``)."""
        return self.f("u_final").blocks()

    def _fold_norms(self, out: dict[str, Tensor]) -> None:
        for key, cname in self.norm_canonical().items():
            nm = self.norms[key]
            out[f"{cname}.w"] = nm.weight.detach().double()
            out[f"{cname}.b"] = nm.bias.detach().double()

    def _fold_lin(self, out: dict[str, Tensor], name: str, m: str, u: str | None) -> None:
        wf, bf = fold_linear(self.w(f"{name}.w"), self.w(f"{name}.b"), self.f(m).blocks(),
                             None if u is None else self.f(u).blocks())
        out[f"{name}.w"] = wf
        if bf is not None:
            out[f"{name}.b"] = bf

    def fold_canonical(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """The folded model's canonical parameters, float64."""
        raise NotImplementedError


class MLPSuperNet(SuperNet):
    """SuperNet of n MLPs (spec §2.1): ``h_l = σ(M_l · (W_l^k U_{l-1,k} h_{l-1} + b_l^k)_k)``, ``U_0 = (I … I)``,
    reconstruction ``U_L h_L``. Factors ``m{l}`` (merge, width d_l) and ``u{l}`` (unmerge); ``u{L-1}`` is
    ``U_final`` with ``n_out`` blocks."""

    spec: MLPSpec

    def __init__(self, spec: MLPSpec, canons: Sequence[Mapping[str, Tensor]], rank: Rank = "full", n_out: int | None = None):
        super().__init__(spec, canons, n_out)
        self.widths = [canons[0][f"l{i}.w"].shape[0] for i in range(spec.depth)]
        for i, d in enumerate(self.widths):
            self._factor(f"m{i}", "merge", d, rank)
            last = i == spec.depth - 1
            self._factor("u_final" if last else f"u{i}", "unmerge", d, rank, self.n_out if last else None)

    def u_key(self, i: int) -> str:
        """The unmerge after hidden layer i (``u_final`` after the last)."""
        return "u_final" if i == self.spec.depth - 1 else f"u{i}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(merged features ``[B, d_L]``, reconstruction ``[B, n_out, d_L]``) -- global FS-Merge (Eq. 4)."""
        act = act_fn(self.spec.act)
        h = x.reshape(x.shape[0], -1)
        for i in range(self.spec.depth):
            w, b = self.w(f"l{i}.w"), self.w(f"l{i}.b")
            z = _shared(h, w, b) if i == 0 else _slin(self.f(self.u_key(i - 1))(h), w, b)
            h = act(self.f(f"m{i}")(z))
        return h, self.f("u_final")(h)

    def local_forward(self, i: int, z: Tensor) -> Tensor:
        """Local FS-Merge of layer i (Eq. 2): ``U_i σ(M_i (z^1‖…‖z^n))`` from the models' pre-activations ``[B, n, d_i]``."""
        return self.f(self.u_key(i))(act_fn(self.spec.act)(self.f(f"m{i}")(z)))

    def fold_canonical(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i in range(self.spec.depth):
            self._fold_lin(out, f"l{i}", f"m{i}", None if i == 0 else self.u_key(i - 1))
        return out


class ViTSuperNet(SuperNet):
    """SuperNet of n pre-LN ViTs (spec §2.3): ``M_in`` after patch/class/position embeddings, per block
    ``U_attn`` (shared by Q, K, V), ``M_q``, ``M_k``, ``M_v``, ``U_o``, ``M_o``, ``U_1``, ``M_1``, ``U_2``, ``M_2``,
    then ``U_out``/``M_proj`` around the projection (if any) and ``U_final``: 1 + 10·L + 3 factors (1 + 10·L + 1
    without projection); learned LayerNorms ``ln_pre`` (if any), ``ln1``, ``ln2`` per block, ``ln_post``."""

    spec: ViTSpec

    def __init__(self, spec: ViTSpec, canons: Sequence[Mapping[str, Tensor]], rank: Rank = 0,
                 n_out: int | None = None, hidden_rank: Rank | None = None):
        super().__init__(spec, canons, n_out)
        c0 = canons[0]
        d, dff = spec.dim, c0["b0.fc1.w"].shape[0] if spec.depth else spec.dim
        rh = scaled_rank(rank, dff, d) if hidden_rank is None else hidden_rank
        self._factor("m_in", "merge", d, rank)
        if "ln_pre.w" in c0:
            self._norm("ln_pre", d, spec.eps)
        for i in range(spec.depth):
            self._norm(f"b{i}_ln1", d, spec.eps)
            for key, kind in (("u_attn", "unmerge"), ("m_q", "merge"), ("m_k", "merge"), ("m_v", "merge"),
                              ("u_o", "unmerge"), ("m_o", "merge"), ("u_1", "unmerge"), ("m_2", "merge")):
                self._factor(f"b{i}_{key}", kind, d, rank)
            self._factor(f"b{i}_m_1", "merge", dff, rh)
            self._factor(f"b{i}_u_2", "unmerge", dff, rh)
            self._norm(f"b{i}_ln2", d, spec.eps)
        self._norm("ln_post", d, spec.eps)
        self.d_out = spec.feature_dim(c0)
        if "proj.w" in c0:
            self._factor("u_out", "unmerge", d, rank)
            # d_out-side factors keep rank r: that is what reproduces the paper's counts (spec §2.5)
            self._factor("m_proj", "merge", self.d_out, rank)
        self._factor("u_final", "unmerge", self.d_out, rank, self.n_out)
        self._fuse_qkv(spec.depth)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(merged features ``g*`` ``[B, d_out]``, reconstruction ``[B, n_out, d_out]``)."""
        s, f, nm = self.spec, self.f, self.norms
        act = act_fn(s.act)
        z = _shared(patchify(images, s.patch), self.w("patch.w"), self.w("patch.b"))  # [B, N, n, d]
        cls = self.w("cls").expand(z.shape[0], 1, -1, -1)
        z = torch.cat([cls, z], dim=1) + self.w("pos").transpose(0, 1)  # [B, T, n, d]
        x = f("m_in")(z)
        if "ln_pre" in nm:
            x = nm["ln_pre"](x)
        d = s.dim
        for i in range(s.depth):
            qkv = _slin(f(f"b{i}_u_attn")(nm[f"b{i}_ln1"](x)), *self.qkv(i))
            q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
            a = mha(f(f"b{i}_m_q")(q), f(f"b{i}_m_k")(k), f(f"b{i}_m_v")(v), s.heads)
            x = x + f(f"b{i}_m_o")(_slin(f(f"b{i}_u_o")(a), self.w(f"b{i}.o.w"), self.w(f"b{i}.o.b")))
            h = act(f(f"b{i}_m_1")(_slin(f(f"b{i}_u_1")(nm[f"b{i}_ln2"](x)), self.w(f"b{i}.fc1.w"), self.w(f"b{i}.fc1.b"))))
            x = x + f(f"b{i}_m_2")(_slin(f(f"b{i}_u_2")(h), self.w(f"b{i}.fc2.w"), self.w(f"b{i}.fc2.b")))
        g = nm["ln_post"](x[:, 0])
        if "u_out" in self.factors:
            g = f("m_proj")(_slin(f("u_out")(g), self.w("proj.w"), self.w("proj.b")))
        return g, f("u_final")(g)

    def fold_canonical(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        m_in = self.f("m_in").blocks()
        self._fold_lin(out, "patch", "m_in", None)
        out["cls"] = fold_rows(self.w("cls"), m_in)
        out["pos"] = fold_rows(self.w("pos"), m_in)
        for i in range(self.spec.depth):
            for x in "qkv":
                self._fold_lin(out, f"b{i}.{x}", f"b{i}_m_{x}", f"b{i}_u_attn")
            self._fold_lin(out, f"b{i}.o", f"b{i}_m_o", f"b{i}_u_o")
            self._fold_lin(out, f"b{i}.fc1", f"b{i}_m_1", f"b{i}_u_1")
            self._fold_lin(out, f"b{i}.fc2", f"b{i}_m_2", f"b{i}_u_2")
        if "u_out" in self.factors:
            self._fold_lin(out, "proj", "m_proj", "u_out")
        self._fold_norms(out)
        return out


class BertSuperNet(SuperNet):
    """SuperNet of n post-LN BERTs (spec §2.4): ``M_emb`` after the summed embedding tables, learned
    ``emb.ln``; per block ``U_att`` (on the residual stream, no pre-LN), ``M_q``, ``M_k``, ``M_v`` (``M_v``
    in the forward *and* the fold: the official code uses ``M_k`` for the values in the forward, spec §2.4),
    ``U_o``, ``M_o``, ``LN_att(x + ·)``, ``U_1``, ``M_1``, ``U_2``, ``M_2``, ``LN_mlp(x + ·)``; pooler
    ``U_pool``, ``M_pool``, tanh; ``U_final``: 1 + 10·L + 3 factors."""

    spec: BertSpec

    def __init__(self, spec: BertSpec, canons: Sequence[Mapping[str, Tensor]], rank: Rank = 0,
                 n_out: int | None = None, hidden_rank: Rank | None = None):
        super().__init__(spec, canons, n_out)
        c0 = canons[0]
        d = spec.dim
        dff = c0["b0.fc1.w"].shape[0] if spec.depth else d
        rh = scaled_rank(rank, dff, d) if hidden_rank is None else hidden_rank
        self._factor("m_emb", "merge", d, rank)
        self._norm("emb_ln", d, spec.eps)
        for i in range(spec.depth):
            for key, kind in (("u_att", "unmerge"), ("m_q", "merge"), ("m_k", "merge"), ("m_v", "merge"),
                              ("u_o", "unmerge"), ("m_o", "merge"), ("u_1", "unmerge"), ("m_2", "merge")):
                self._factor(f"b{i}_{key}", kind, d, rank)
            self._factor(f"b{i}_m_1", "merge", dff, rh)
            self._factor(f"b{i}_u_2", "unmerge", dff, rh)
            self._norm(f"b{i}_ln_att", d, spec.eps)
            self._norm(f"b{i}_ln_mlp", d, spec.eps)
        self._factor("u_pool", "unmerge", d, rank)
        self._factor("m_pool", "merge", d, rank)
        self._factor("u_final", "unmerge", d, rank, self.n_out)
        self._fuse_qkv(spec.depth)

    def norm_canonical(self) -> dict[str, str]:
        out = {"emb_ln": "emb.ln"}
        for i in range(self.spec.depth):
            out[f"b{i}_ln_att"] = f"b{i}.ln_att"
            out[f"b{i}_ln_mlp"] = f"b{i}.ln_mlp"
        return out

    def forward(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(merged pooled features ``[B, d]``, reconstruction ``[B, n_out, d]``)."""
        s, f, nm = self.spec, self.f, self.norms
        act = act_fn(s.act)
        ids, tt, keep = s.unpack(inputs)
        t = ids.shape[1]
        e = self.w("emb.word")[:, ids] + self.w("emb.type")[:, tt] + self.w("emb.pos")[:, :t].unsqueeze(1)
        x = nm["emb_ln"](f("m_emb")(e.movedim(0, -2)))  # [n, B, T, d] -> [B, T, n, d] -> merged
        d = s.dim
        for i in range(s.depth):
            qkv = _slin(f(f"b{i}_u_att")(x), *self.qkv(i))
            q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
            a = mha(f(f"b{i}_m_q")(q), f(f"b{i}_m_k")(k), f(f"b{i}_m_v")(v), s.heads, keep)
            x = nm[f"b{i}_ln_att"](x + f(f"b{i}_m_o")(_slin(f(f"b{i}_u_o")(a), self.w(f"b{i}.o.w"), self.w(f"b{i}.o.b"))))
            h = act(f(f"b{i}_m_1")(_slin(f(f"b{i}_u_1")(x), self.w(f"b{i}.fc1.w"), self.w(f"b{i}.fc1.b"))))
            x = nm[f"b{i}_ln_mlp"](x + f(f"b{i}_m_2")(_slin(f(f"b{i}_u_2")(h), self.w(f"b{i}.fc2.w"), self.w(f"b{i}.fc2.b"))))
        g = torch.tanh(f("m_pool")(_slin(f("u_pool")(x[:, 0]), self.w("pool.w"), self.w("pool.b"))))
        return g, f("u_final")(g)

    def fold_canonical(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        m_emb = self.f("m_emb").blocks()
        for t in ("word", "pos", "type"):
            out[f"emb.{t}"] = fold_rows(self.w(f"emb.{t}"), m_emb)
        for i in range(self.spec.depth):
            for x in "qkv":
                self._fold_lin(out, f"b{i}.{x}", f"b{i}_m_{x}", f"b{i}_u_att")
            self._fold_lin(out, f"b{i}.o", f"b{i}_m_o", f"b{i}_u_o")
            self._fold_lin(out, f"b{i}.fc1", f"b{i}_m_1", f"b{i}_u_1")
            self._fold_lin(out, f"b{i}.fc2", f"b{i}_m_2", f"b{i}_u_2")
        self._fold_lin(out, "pool", "m_pool", "u_pool")
        self._fold_norms(out)
        return out


def build_supernet(
    spec: Spec,
    models: Sequence[Mapping[str, Tensor]],
    *,
    rank: Rank = 0,
    hidden_rank: Rank | None = None,
    init: str = "first",
    anchor: int = 0,
    n_out: int | None = None,
    seed: int = 0,
    data: object = None,
) -> SuperNet:
    """A SuperNet over ``models`` (state dicts in ``spec``'s layout), initialised by ``init``
    (``first`` | ``average`` | ``random`` | ``zipit``, see ``init.py``; ``anchor`` = the "first" model,
    ``data`` = unlabeled inputs for ``zipit``). ``rank``: r ≥ 0 for diagonal + rank-r factors, ``"full"``
    for dense blocks; ``n_out``: number of task blocks of ``U_final`` (default: one per model)."""
    from .arch import canonical_fp32
    from .init import initialize

    if len(models) < 1:
        raise ValueError("build_supernet: no models")
    canons = [canonical_fp32(spec, m) for m in models]
    if isinstance(spec, MLPSpec):
        sn: SuperNet = MLPSuperNet(spec, canons, rank, n_out)
    elif isinstance(spec, ViTSpec):
        sn = ViTSuperNet(spec, canons, rank, n_out, hidden_rank)
    elif isinstance(spec, BertSpec):
        sn = BertSuperNet(spec, canons, rank, n_out, hidden_rank)
    else:
        raise TypeError(f"unknown architecture spec {type(spec).__name__}")
    initialize(sn, init, canons, anchor=anchor, seed=seed, data=data)
    return sn


def expected_learnable(kind: str, n: int, d: int, depth: int, r: int, *, d_ff: int, d_out: int | None = None,
                       n_out: int | None = None, ln_pre: bool = True) -> int:
    """The spec's parameter count (§2.5) of a transformer SuperNet with diagonal + rank-r factors: each
    factor of width w and rank q has ``n·w + n·w·q + q·w`` parameters, hidden-side rank ``q = r·d_ff/d``,
    plus two vectors per learned LayerNorm."""
    n_out = n if n_out is None else n_out
    fac = lambda w, q, k=n: k * w + k * w * q + q * w  # noqa: E731
    rh = r * d_ff // d if r else 0
    per_block = 8 * fac(d, r) + 2 * fac(d_ff, rh)
    if kind == "vit":
        lns = (2 * depth + 1 + (1 if ln_pre else 0)) * 2 * d
        total = fac(d, r) + depth * per_block + lns
        if d_out is not None:
            total += fac(d, r) + fac(d_out, r) + fac(d_out, r, n_out)
        else:
            total += fac(d, r, n_out)
        return total
    if kind == "bert":
        lns = (2 * depth + 1) * 2 * d
        return fac(d, r) + depth * per_block + lns + 2 * fac(d, r) + fac(d, r, n_out)
    raise ValueError(f"unknown kind {kind!r}")
