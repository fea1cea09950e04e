"""fastmerge.research.analysis: magnification, templates rendered as PNG grids, class means, rank correlation."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from torch import nn

from fastmerge.research.analysis import (
    GapEntry, class_means, gap_table, grid_layout, magnified, magnify, render_templates, spearman, templates,
)
from fastmerge.errors import ConfigError


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_magnify_scales_float_tensors_only():
    sd = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5]), "n": torch.tensor(3)}
    out = magnify(sd, 10.0)
    assert torch.equal(out["w"], torch.tensor([10.0, -20.0])) and torch.equal(out["b"], torch.tensor([5.0]))
    assert int(out["n"]) == 3
    only_w = magnify(sd, 10.0, include=lambda k: k == "w")
    assert torch.equal(only_w["b"], sd["b"])
    assert torch.equal(sd["w"], torch.tensor([1.0, -2.0]))  # the input is not modified


def test_magnified_relu_net_is_homogeneous():
    # Without biases a ReLU net is positively homogeneous: f_{cθ}(x) = c^L f_θ(x), here L = 2 layers.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    x = torch.randn(4, 6)
    big = magnified(net, 3.0)
    torch.testing.assert_close(big(x), 9.0 * net(x), rtol=1e-5, atol=1e-6)
    assert big is not net and torch.equal(net[0].weight, magnified(net, 1.0)[0].weight)


def test_class_means_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    y = torch.tensor([0, 0, 2])
    torch.testing.assert_close(class_means(x, y, 3), torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]]))


def test_templates_reshape_rows():
    w = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)
    t = templates(w, (3, 4))
    assert t.shape == (2, 3, 4) and t[1, 2, 3] == 23.0 and t[0, 1, 0] == 4.0
    with pytest.raises(ConfigError, match="H·W = 10"):
        templates(w, (2, 5))


@pytest.mark.parametrize("n,labels,scale,ncols", [(10, True, 16, None), (7, False, 5, 3), (1, False, 1, None)])
def test_render_templates_png_size(tmp_path, n, labels, scale, ncols):
    imgs = torch.randn(n, 8, 8)
    p = render_templates(imgs, tmp_path / "t.png", labels=[str(i) for i in range(n)] if labels else None,
                         scale=scale, ncols=ncols)
    lay = grid_layout(n, (8, 8), ncols=ncols, scale=scale, labels=labels)
    assert _png_size(p) == (lay.width, lay.height)


def test_grid_layout_by_hand():
    # 10 labelled 8x8 templates at 16 px a pixel, 8 px padding: 10·128 + 11·8 = 1368 wide, 128 + 14 + 2·8 = 158 high
    lay = grid_layout(10, (8, 8), scale=16, labels=True)
    assert (lay.width, lay.height) == (1368, 158)
    # 7 unlabelled in 3 columns at 5 px: 3 rows; 3·40 + 4·2 = 128 wide, 3·40 + 4·2 = 128 high
    lay = grid_layout(7, (8, 8), ncols=3, scale=5)
    assert (lay.rows, lay.width, lay.height) == (3, 128, 128)


def test_render_templates_errors(tmp_path):
    with pytest.raises(ConfigError, match="2 labels for 3"):
        render_templates(torch.randn(3, 4, 4), tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ConfigError, match=r"\[n, H, W\]"):
        render_templates(torch.randn(3, 16), tmp_path / "x.png")


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (1,3,2,4): d² = 0+1+1+0 = 2, ρ = 1 - 6·2 / (4·15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: a = (1, 1, 2) -> ranks (1.5, 1.5, 3); b = (5, 6, 7) -> (1, 2, 3): Pearson of the ranks = √3/2
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_gap_table_sorted_by_mloss():
    rows, rho = gap_table([GapEntry("b", 2.0, 0.80, 0.90), GapEntry("a", 1.0, 0.90, 0.92), GapEntry("c", 3.0, 0.5, 0.9)])
    assert [r[0] for r in rows] == ["a", "b", "c"]
    assert rows[1] == ["b", "2", "80.00", "90.00", "+10.00"]
    assert rho == pytest.approx(1.0)  # gaps 0.02 < 0.10 < 0.40 follow the M-Loss order
