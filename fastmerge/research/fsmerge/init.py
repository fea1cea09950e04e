"""SuperNet initialisations (spec §2.6, paper Eq. 6, App. G.1/G.4).

Row convention, ``M ∈ R^{n·d×d}`` (merge), ``U ∈ R^{d×n·d}`` (unmerge):

=========  ====================  ==============  ==============================================
name       M                     U               LayerNorms
=========  ====================  ==============  ==============================================
first      ``[I; 0; …; 0]``      ``[I, …, I]``   the anchor model's (folded model == that model)
average    ``[I/n; …; I/n]``     ``[I, …, I]``   mean (folded model == plain weight average)
random     Gaussian              Gaussian        LayerNorm defaults (1, 0)
zipit      ZipIt matching (½)    ``2 Mᵀ``        n/a (MLPs, pairs, ``rank="full"``)
=========  ====================  ==============  ==============================================

Low-rank terms under first/average start at exactly zero (``a = 0``, ``b ~ N(0,1)·0.1·d^{-1/2}/r``, the
official code's scale) so the initialisation is exact and gradients still reach ``a`` (∂L/∂a ∝ bᵀ ≠ 0).
Under random: diagonals 0, both factors ``N(0,1)·d^{-1/2}/√r`` (code); dense blocks He-style.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .arch import Inputs

Tensor = torch.Tensor
SCHEMES = ("first", "average", "random", "zipit")


def init_factor(f, scheme: str, *, anchor: int = 0, gen: torch.Generator | None = None) -> None:
    """Set ``f`` (a ``supernet.Factor``) to ``scheme`` (``first`` | ``average`` | ``random``) in place."""
    n, d = f.n, f.d
    merge = f.kind == "merge"
    with torch.no_grad():
        if scheme == "random":
            if f.rank == "full":
                # He-style: a merge is followed by the activation (fan-in n·d, gain 2); an unmerge feeds a linear
                std = math.sqrt(2.0 / (n * d)) if merge else math.sqrt(1.0 / d)
                f.full.copy_(torch.randn(f.full.shape, generator=gen) * std)
                return
            if f.rank == 0:
                f.diag.copy_(torch.randn(f.diag.shape, generator=gen) / (math.sqrt(n) if merge else 1.0))
                return
            f.diag.zero_()
            s = d ** -0.5 / math.sqrt(f.rank)
            f.a.copy_(torch.randn(f.a.shape, generator=gen) * s)
            f.b.copy_(torch.randn(f.b.shape, generator=gen) * s)
            return
        if scheme not in ("first", "average"):
            raise ValueError(f"unknown init {scheme!r} for a factor (known: first, average, random)")
        if merge:
            vals = torch.zeros(n)
            if scheme == "first":
                vals[anchor] = 1.0
            else:
                vals.fill_(1.0 / n)
        else:
            vals = torch.ones(n)
        if f.rank == "full":
            f.full.copy_(vals[:, None, None] * torch.eye(d).expand(n, d, d))
            return
        f.diag.copy_(vals[:, None].expand(n, d))
        if f.rank:
            f.a.zero_()
            f.b.copy_(torch.randn(f.b.shape, generator=gen) * (0.1 * d ** -0.5 / f.rank))


def init_norms(sn, scheme: str, canons: Sequence[Mapping[str, Tensor]], anchor: int = 0) -> None:
    """LayerNorms: the anchor's (first), the mean (average), defaults (random / zipit)."""
    with torch.no_grad():
        for key, cname in sn.norm_canonical().items():
            nm = sn.norms[key]
            if scheme == "first":
                w, b = canons[anchor][f"{cname}.w"], canons[anchor][f"{cname}.b"]
            elif scheme == "average":
                w = torch.stack([c[f"{cname}.w"] for c in canons]).mean(0)
                b = torch.stack([c[f"{cname}.b"] for c in canons]).mean(0)
            else:
                w, b = torch.ones_like(nm.weight), torch.zeros_like(nm.bias)
            nm.weight.copy_(w)
            nm.bias.copy_(b)


def zipit_match(feats: Tensor, d: int) -> Tensor:
    """ZipIt's greedy matching (Stoica et al. 2024, as FS-Merge uses it, spec §2.1): ``feats`` ``[N, 2d]``
    (both models' neurons side by side); repeatedly pair the two most correlated unmatched neurons, within
    or across models, until d pairs remain. Returns ``M`` ``[2d, d]`` with ``M[i, p] = M[j, p] = ½``."""
    c = torch.corrcoef(feats.double().T)
    # dead ReLU units have zero variance: correlation 0 (they pair up last, with each other)
    c = torch.nan_to_num(c, nan=0.0)
    c.fill_diagonal_(-math.inf)
    m = torch.zeros(feats.shape[1], d, dtype=torch.float64)
    for p in range(d):
        flat = int(torch.argmax(c))
        i, j = divmod(flat, c.shape[1])
        m[i, p] = m[j, p] = 0.5
        c[[i, j], :] = -math.inf
        c[:, [i, j]] = -math.inf
    return m


def init_zipit(sn, canons: Sequence[Mapping[str, Tensor]], data: Inputs) -> None:
    """ZipIt as FS-Merge with hard-coded factors (spec §2.1, App. A.2): per hidden layer, ``M_l`` from
    the matching of both models' activations on ``data`` and ``U_l = 2 M_lᵀ``."""
    from .arch import MLPSpec

    if not isinstance(sn.spec, MLPSpec):  # the spec, not the SuperNet class: supernet.py imports this module
        raise ValueError("zipit init is defined for MLPs only (spec §2.6)")
    if sn.n != 2 or sn.n_out != 2:
        raise ValueError(f"zipit init merges pairs of models, got n={sn.n}")
    if data is None:
        raise ValueError("zipit init needs data (unlabeled inputs) to match neurons")
    if any(sn.f(k).rank != "full" for k in sn.factors):
        raise ValueError("zipit init needs rank='full' (a matching is not diagonal + low rank)")
    traces: list[list[tuple[Tensor, Tensor]]] = []
    with torch.no_grad():
        for c in canons:
            tr: list[tuple[Tensor, Tensor]] = []
            sn.spec.forward(c, data, trace=tr)
            traces.append(tr)
        for i, d in enumerate(sn.widths):
            m = zipit_match(torch.cat([traces[0][i][1], traces[1][i][1]], dim=1), d).float()
            blocks = m.reshape(2, d, d)  # rows k·d..(k+1)·d of M are model k's block
            sn.f(f"m{i}").full.copy_(blocks)
            sn.f(sn.u_key(i)).full.copy_(2.0 * blocks.transpose(1, 2))


def initialize(sn, scheme: str, canons: Sequence[Mapping[str, Tensor]], *, anchor: int = 0, seed: int = 0,
               data: Inputs | None = None) -> None:
    """Initialise every factor and LayerNorm of ``sn`` by ``scheme`` (see the module docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init {scheme!r} (known: {', '.join(SCHEMES)})")
    if not 0 <= anchor < sn.n:
        raise ValueError(f"anchor {anchor} out of range for {sn.n} models")
    gen = torch.Generator().manual_seed(seed)
    if scheme == "zipit":
        init_zipit(sn, canons, data)
        return
    for f in sn.factors.values():
        init_factor(f, scheme, anchor=anchor, gen=gen)
    init_norms(sn, scheme, canons, anchor)
