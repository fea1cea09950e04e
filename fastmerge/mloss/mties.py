"""M-TIES: TIES whose trim keeps a per-row fraction set by the node M-Loss (paper Section 5, Algorithm 1).

For a target matrix (the weight of a linear layer that feeds an activation: row j = the parameters
linearly correlated with node j, Definition 3.2) and node M-Loss L_j of its d rows:

    r_j    = rank of L_j among the d rows / (d − 1) ∈ [0, 1]    (0 = lowest loss; ties by row order)
    keep_j = k − e·r_j ∈ [k − e, k]                            (k = density; the official code's RankNorm)
    n_j    = max(1, ⌊keep_j · n_cols⌋)                         (entries kept in row j of each task vector)
    trim:  row j of δ_i = x_i − base keeps its entries with |δ| ≥ the n_j-th largest |δ| of that row
           ("threshold", the official code: topk, then ≥ its minimum) or exactly n_j ("topk")

then TIES' sign election and disjoint mean (``fastmerge.methods.gta``), λ = 1 and uniform weights in
the official code. Every other tensor gets ordinary per-tensor TIES trim with density k. With e = 0
every row keeps ⌊k·n_cols⌋: TIES applied row by row.

The per-row selection is batched over all rows (no Python loop over rows): a partial ``topk`` of only
the band of ranks M-TIES needs (CPU), a sort-free radix select (``method="radix"``), or on CUDA
``kernels/topk_rows.py`` (one program per row).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ConfigError
from ..methods.gta import merge_fp32
from ..methods.ties import trim_mask


def rank_scale(loss: torch.Tensor) -> torch.Tensor:
    """Rank of each entry (stable: equal losses keep row order) divided by (n − 1); fp64, 0 for n = 1."""
    n = loss.numel()
    order = torch.argsort(loss.reshape(-1).double(), stable=True)
    r = torch.empty(n, dtype=torch.float64, device=loss.device)
    r[order] = torch.arange(n, dtype=torch.float64, device=loss.device)
    return r / (n - 1) if n > 1 else r


def row_keep_ratios(loss: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """keep_j = density − epsilon·rank_scale(loss)_j (fp64): the lowest loss keeps ``density``."""
    return density - epsilon * rank_scale(loss)


def keep_counts(ratios: torch.Tensor, cols: int) -> torch.Tensor:
    """max(1, ⌊ratio·cols⌋), at most ``cols`` (int64), as ties' ``keep_count`` per row."""
    return torch.clamp(torch.floor(ratios.double() * cols), 1, max(cols, 1)).to(torch.int64)


#: rows per radix pass chunk: bounds the int64 index scratch of bincount to ~32 MB
_CHUNK_ELEMS = 4 << 20


def row_kth_largest(mag: torch.Tensor, k: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """fp32 [R]: the k[r]-th largest value of each row of ``mag`` [R, C] (non-negative floats), k in [1, C].

    "topk" (CPU default): a partial selection of only the band of ranks needed, the kmax largest or the
    C − kmin + 1 smallest of each row, whichever is fewer (M-TIES' ranks span e·C: with k = 0.8, e = 0.1
    that is the 30% smallest), then a gather at each row's own rank. Measured on 3000×2048 fp32 here:
    0.075 s against 0.25 s for "radix" and 0.6 s for a full sort.
    "radix": sort-free radix select on the fp32 bit patterns (non-negative floats order like their
    integer patterns): per 8-bit digit, most significant first, one ``bincount`` histogram of the
    still-candidate entries of every row at once, and the digit where the count from the top reaches the
    remaining rank. CUDA tensors: ``kernels/topk_rows.py``."""
    if mag.device.type == "cuda" and method == "auto":
        from ..kernels.topk_rows import row_kth_largest as kernel

        return kernel(mag, k)
    if method not in ("auto", "topk", "radix"):
        raise ConfigError(f"row_kth_largest: method must be 'auto', 'topk' or 'radix', got {method!r}")
    R, C = mag.shape
    out = torch.empty(R, dtype=torch.float32, device=mag.device)
    if R == 0:
        return out
    k = k.to(device=mag.device, dtype=torch.int64)
    rows_per = max(1, _CHUNK_ELEMS // max(C, 1))
    for r0 in range(0, R, rows_per):
        m = mag[r0:r0 + rows_per].float().abs().contiguous()  # abs: −0.0 → +0.0
        kr = k[r0:r0 + rows_per]
        out[r0:r0 + m.shape[0]] = _radix(m, kr) if method == "radix" else _band_topk(m, kr)
    return out


def _band_topk(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    C = m.shape[1]
    kmax, kmin = int(k.max()), int(k.min())
    if kmax <= C - kmin + 1:
        v = torch.topk(m, kmax, dim=1, largest=True, sorted=True).values
        return v.gather(1, (k - 1)[:, None]).squeeze(1)
    v = torch.topk(m, C - kmin + 1, dim=1, largest=False, sorted=True).values
    return v.gather(1, (C - k)[:, None]).squeeze(1)


def _radix(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    bits = m.view(torch.int32)
    n = bits.shape[0]
    need = k.clone()
    prefix = torch.zeros(n, dtype=torch.int32, device=m.device)
    base = (torch.arange(n, dtype=torch.int64, device=m.device) * 257)[:, None]
    for shift in (24, 16, 8, 0):
        digit = ((bits >> shift) & 255).to(torch.int64)
        if shift != 24:
            digit = torch.where((bits >> (shift + 8)) == prefix[:, None], digit, 256)
        hist = torch.bincount((base + digit).reshape(-1), minlength=n * 257).reshape(n, 257)[:, :256]
        from_top = hist.flip(1).cumsum(1).flip(1)  # [r, d] = candidates with digit ≥ d
        d_star = (from_top >= need[:, None]).sum(1) - 1
        above = from_top.gather(1, d_star[:, None]).squeeze(1) - hist.gather(1, d_star[:, None]).squeeze(1)
        need = need - above
        prefix = (prefix << 8) | d_star.to(torch.int32)
    return prefix.view(torch.float32)


def trim_rows(delta: torch.Tensor, counts: torch.Tensor, selection: str = "threshold") -> torch.Tensor:
    """Boolean keep mask of ``delta`` [R, ...] (rows = first dim): row r keeps its entries with
    |δ| ≥ the counts[r]-th largest |δ| of the row ("threshold") or exactly counts[r] of them ("topk",
    boundary ties broken by column order)."""
    if selection not in ("threshold", "topk"):
        raise ConfigError(f"trim_rows: selection must be 'threshold' or 'topk', got {selection!r}")
    d2 = delta.reshape(delta.shape[0], -1)
    mag = d2.float().abs()
    thr = row_kth_largest(mag, counts.to(mag.device))[:, None]
    keep = mag >= thr
    if selection == "topk":
        above = mag > thr
        room = counts.to(mag.device)[:, None] - above.sum(1, keepdim=True)
        at = mag == thr
        keep = above | (at & (torch.cumsum(at, 1) <= room))
    return keep.reshape(delta.shape)


def m_ties_tensors(
    inputs: Sequence[torch.Tensor], base: torch.Tensor, *, row_loss: torch.Tensor | None = None,
    weight: Sequence[float] | None = None, density: "float | Sequence[float]" = 0.8, epsilon: float = 0.1,
    normalize: bool = True, lambda_: float = 1.0, election: str = "sum", selection: str = "threshold",
    rescale: bool = False,
) -> torch.Tensor:
    """M-TIES of one tensor (fp32 result). ``row_loss`` [rows] (node M-Loss of the rows of a target
    matrix) selects the per-row trim; without it, ordinary per-tensor TIES. ``weight`` default 1 each
    (with ``normalize``: the official disjoint mean); ``density`` a float or one per model."""
    T = len(inputs)
    w = [1.0] * T if weight is None else [float(v) for v in weight]
    dens = [float(density)] * T if isinstance(density, (int, float)) else [float(v) for v in density]
    if len(w) != T or len(dens) != T:
        raise ConfigError(f"m_ties: {len(w)} weights / {len(dens)} densities for {T} models")
    check_mties(dens, epsilon, "m_ties")
    if row_loss is None or base.dim() == 0:
        keep_fn = lambda i, d: trim_mask(d, dens[i], selection)  # noqa: E731
    else:
        if row_loss.numel() != base.shape[0]:
            raise ConfigError(f"m_ties: {row_loss.numel()} row losses for a tensor of {base.shape[0]} rows")
        cols = base[0].numel()
        rs = rank_scale(row_loss.detach().cpu())

        def keep_fn(i: int, d: torch.Tensor) -> torch.Tensor | None:
            if dens[i] >= 1 and epsilon == 0:
                return None
            return trim_rows(d, keep_counts(dens[i] - epsilon * rs, cols), selection)

    return merge_fp32(inputs, base, w, keep_fn, rescale, election, normalize, lambda_)


def check_mties(density: Sequence[float], epsilon: float, where: str) -> None:
    for i, d in enumerate(density):
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise ConfigError(f"{where}: density of model #{i + 1} must be in (0, 1], got {d}")
        if not (0.0 <= epsilon <= d):
            raise ConfigError(f"{where}: epsilon must be in [0, density] (keep ratios in [density − epsilon, density]), "
                              f"got epsilon={epsilon}, density={d}")


def m_ties_modules(
    base: torch.nn.Module, models: Sequence[torch.nn.Module], batches, targets=None, *,
    density: "float | Sequence[float]" = 0.8, epsilon: float = 0.1, weight: Sequence[float] | None = None,
    layers: Sequence[str] | None = None, statistic: str = "sq", mode: str = "progressive",
    alpha: Sequence[float] | None = None, normalize: bool = True, lambda_: float = 1.0, election: str = "sum",
    selection: str = "threshold", rescale: bool = False, backend: str = "auto",
):
    """M-TIES of torch modules (same architecture): returns ``ModuleMLoss`` whose ``merged`` is the merged
    state dict (parameters in ``base``'s dtypes, buffers copied from ``base``) and ``losses`` the node M-Loss.

    ``targets``: the linear layers feeding activations (``fastmerge.mloss.Target``; default: found by
    ``find_targets``). ``layers``: the few-layer variant, the names of the targets whose rows get M-Loss
    ratios (the others are trimmed as ordinary TIES; their M-Loss is still measured). ``mode``:
    "progressive" (paper: inputs from the model merged so far) or "base" (official code). ``alpha``: the
    M-Loss merging weights (default: ``weight`` normalised to sum 1, else uniform)."""
    from .hooks import walk

    q = len(models)
    w = [1.0] * q if weight is None else [float(v) for v in weight]
    if alpha is None:
        s = sum(w)
        alpha = [v / s for v in w] if s != 0 else None
    dens = [float(density)] * q if isinstance(density, (int, float)) else [float(v) for v in density]
    check_mties(dens, epsilon, "m_ties_modules")
    chosen = None if layers is None else set(layers)
    tnames: set[str] = set()

    def merge_fn(name, xs, b, row_loss):
        use = row_loss if (row_loss is not None and xs[0].dim() >= 2 and
                           (chosen is None or name.rsplit(".", 1)[0] in chosen or name in tnames)) else None
        out = m_ties_tensors(xs, b.float(), row_loss=use, weight=w, density=dens, epsilon=epsilon,
                             normalize=normalize, lambda_=lambda_, election=election, selection=selection,
                             rescale=rescale)
        return out.to(b.dtype)

    if chosen is not None and targets is not None:
        # a gated pair is chosen by its gate's (linear's) name: its up projection follows
        for t in targets:
            if t.linear in chosen and t.up is not None:
                tnames.add(t.up + ".weight")
    res = walk(models, batches, targets, base=base, mode=mode, alpha=alpha, backend=backend, merge_fn=merge_fn,
               statistic=statistic)
    sd = dict(res.merged or {})
    for k, v in base.state_dict().items():
        if k not in sd:
            sd[k] = v.detach().clone()
    res.merged = sd
    return res
