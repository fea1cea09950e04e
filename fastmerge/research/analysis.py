"""Analyses of merged models: weight magnification, weight templates as images, M-Loss vs accuracy gaps.

Paper: Wang et al., "Rethinking Weight-Averaged Model-merging", https://arxiv.org/abs/2411.09263
(Sec. 3 and 6.1: the rows of a linear classifier are class templates, and averaging two classifiers
averages their templates; Sec. 5 and 6.3: scaling every weight by c, "magnification", hurts ensembles
more than soups); M-Loss: https://arxiv.org/abs/2602.08564 (the merging-ensembling discrepancy as a
predictor of how much merging loses against ensembling).

    magnify(sd, c)                    c·θ for every floating-point tensor (or the ``include``-d ones)
    magnified(model, c)               a copy of ``model`` with magnified weights
    class_means(x, y)                 the average image of every class (the paper's Fig. 1a)
    template_grid / render_templates  rows of a linear layer reshaped to images, as a PNG grid of exact size
    spearman(a, b)                    rank correlation (average ranks for ties)
    gap_table(entries)                rows of (group, M-Loss, merged acc, ensemble acc, gap) + Spearman ρ
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError


def magnify(
    sd: Mapping[str, torch.Tensor], c: float, include: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """``c·θ`` for every floating-point tensor of ``sd`` (only those whose name passes ``include`` if given);
    other tensors are returned as they are. Scaling by c multiplies each element's variance by c²
    (c = 100: 10,000×, the paper's Sec. 8)."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and (include is None or include(k)):
            out[k] = v * c
        else:
            out[k] = v
    return out


def magnified(model: nn.Module, c: float, include: Callable[[str], bool] | None = None) -> nn.Module:
    """A deep copy of ``model`` whose parameters and float buffers are ``magnify``-ed by ``c``."""
    m = copy.deepcopy(model)
    m.load_state_dict(magnify(m.state_dict(), c, include))
    return m


def class_means(x: torch.Tensor, y: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
    """The mean input of every class: ``[n_classes, *x.shape[1:]]`` (a class without examples is zeros)."""
    n = int(y.max()) + 1 if n_classes is None else n_classes
    flat = x.reshape(x.shape[0], -1).float()
    sums = torch.zeros(n, flat.shape[1]).index_add_(0, y, flat)
    counts = torch.bincount(y, minlength=n).clamp_min(1).unsqueeze(1).float()
    return (sums / counts).reshape(n, *x.shape[1:])


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a template grid: ``width`` x ``height`` pixels in all."""

    rows: int
    cols: int
    cell_h: int  # image rows · scale
    cell_w: int
    pad: int
    label_px: int

    @property
    def width(self) -> int:
        return self.cols * self.cell_w + (self.cols + 1) * self.pad

    @property
    def height(self) -> int:
        return self.rows * (self.cell_h + self.label_px) + (self.rows + 1) * self.pad


def grid_layout(n: int, image_shape: tuple[int, int], *, ncols: int | None = None, scale: int = 16,
                pad: int | None = None, labels: bool = False) -> GridLayout:
    """The layout ``render_templates`` uses for ``n`` images: ``ncols`` columns (default min(n, 10)),
    every pixel ``scale``x``scale``, ``pad`` (default scale/2) pixels between and around cells, plus a
    14-pixel label band above each cell when ``labels``."""
    if n < 1:
        raise ConfigError("render_templates: nothing to render")
    if scale < 1:
        raise ConfigError(f"render_templates: scale must be >= 1, got {scale}")
    cols = ncols or min(n, 10)
    rows = math.ceil(n / cols)
    return GridLayout(rows, cols, image_shape[0] * scale, image_shape[1] * scale,
                      scale // 2 if pad is None else pad, 14 if labels else 0)


def templates(weight: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
    """The rows of a linear layer's weight ``[n_out, H·W]`` as images ``[n_out, H, W]`` (row-major pixels)."""
    w = weight.detach().float()
    if w.dim() != 2 or w.shape[1] != image_shape[0] * image_shape[1]:
        raise ConfigError(f"templates: weight {list(w.shape)} does not have H·W = {image_shape[0] * image_shape[1]} columns")
    return w.reshape(w.shape[0], *image_shape)


def render_templates(
    images: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    scale: int = 16,
    pad: int | None = None,
    cmap: str = "RdBu_r",
    shared_scale: bool = True,
    title: str | None = None,
) -> Path:
    """Write ``images`` (``[n, H, W]``, e.g. ``templates(layer.weight, (8, 8))``) as one PNG grid at ``path``.

    The PNG is exactly ``grid_layout(...).width`` x ``.height`` pixels. The colour range is symmetric,
    ±max|value|, over the whole grid (``shared_scale=True``, so that a merged template that fades shows
    fainter, as the paper's Fig. 2) or per image. A ``title`` goes into the PNG's metadata, not the pixels."""
    imgs = torch.stack([torch.as_tensor(i).detach().float() for i in images]) if not isinstance(images, torch.Tensor) \
        else images.detach().float()
    if imgs.dim() != 3:
        raise ConfigError(f"render_templates: images must be [n, H, W], got {list(imgs.shape)}")
    n, h, w = imgs.shape
    if labels is not None and len(labels) != n:
        raise ConfigError(f"render_templates: {len(labels)} labels for {n} images")
    lay = grid_layout(n, (h, w), ncols=ncols, scale=scale, pad=pad, labels=labels is not None)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    dpi = 100
    fig = Figure(figsize=(lay.width / dpi, lay.height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    vmax_all = float(imgs.abs().max()) or 1.0
    W, H = lay.width, lay.height
    for i in range(n):
        r, c = divmod(i, lay.cols)
        x0 = lay.pad + c * (lay.cell_w + lay.pad)
        top = lay.pad + r * (lay.cell_h + lay.label_px + lay.pad)  # from the top edge
        y0 = H - (top + lay.label_px + lay.cell_h)
        ax = fig.add_axes((x0 / W, y0 / H, lay.cell_w / W, lay.cell_h / H))
        vmax = vmax_all if shared_scale else (float(imgs[i].abs().max()) or 1.0)
        ax.imshow(imgs[i].numpy(), cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        if labels is not None:
            fig.text((x0 + lay.cell_w / 2) / W, (H - top - lay.label_px / 2) / H, str(labels[i]),
                     ha="center", va="center", fontsize=8)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi, facecolor="white", metadata={"Title": title} if title else None)
    return p


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equal-length sequences (average ranks for ties; NaN if a side is constant)."""
    if len(a) != len(b):
        raise ConfigError(f"spearman: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        return float("nan")

    def ranks(v: Sequence[float]) -> torch.Tensor:
        t = torch.tensor([float(x) for x in v], dtype=torch.float64)
        order = torch.argsort(t, stable=True)  # the exact ranks need a sort; n is a table's row count
        r = torch.empty_like(t)
        r[order] = torch.arange(1, len(t) + 1, dtype=torch.float64)
        for val in torch.unique(t):  # ties share the mean of their ranks
            m = t == val
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class GapEntry:
    """One group of models: its M-Loss (any scalar: layer mean, sum...) and the accuracies of their merge
    and of their ensemble on the same inputs."""

    group: str
    mloss: float
    merged_acc: float
    ensemble_acc: float

    @property
    def gap(self) -> float:
        """Ensemble minus merged accuracy (> 0: merging loses)."""
        return self.ensemble_acc - self.merged_acc


def gap_table(entries: Sequence[GapEntry]) -> tuple[list[list[str]], float]:
    """Markdown-ready rows (group, M-Loss, merged %, ensemble %, gap in points) sorted by M-Loss, and the
    Spearman correlation between M-Loss and the gap (the paper's claim: positive)."""
    rows = [
        [e.group, f"{e.mloss:.4g}", f"{100 * e.merged_acc:.2f}", f"{100 * e.ensemble_acc:.2f}", f"{100 * e.gap:+.2f}"]
        for e in sorted(entries, key=lambda e: e.mloss)
    ]
    return rows, spearman([e.mloss for e in entries], [e.gap for e in entries])


__all__ = [
    "magnify", "magnified", "class_means", "templates", "GridLayout", "grid_layout", "render_templates",
    "spearman", "GapEntry", "gap_table",
]
