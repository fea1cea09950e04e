"""M-Loss definitions (paper Defs. 3.3-3.6) on hand-computed examples, identities, Remark 2, validation."""

import math

import pytest
import torch

from fastmerge.errors import ConfigError
from fastmerge.mloss import (
    activation, compute_mloss, discrepancy, mloss_chunked, mloss_from_preacts, mloss_reference, preactivations,
)

EPS = 1e-4


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_relu_two_models_by_hand():
    # h [q=2, B=2, d=2]; sample 0: merged pre-act (−1, 1) → (0, 1); ensemble ½(1, 0) + ½(0, 4) = (0.5, 2)
    # → D = (−0.5, −1). Sample 1: identical models → D = 0.
    h = torch.tensor([[[1.0, -2.0], [2.0, 2.0]], [[-3.0, 4.0], [2.0, 2.0]]])
    s = mloss_from_preacts(h, act="relu", eps=EPS)
    assert s.samples == 2
    assert torch.allclose(s.node("abs"), torch.tensor([0.25, 0.5]))
    assert torch.allclose(s.node("sq"), torch.tensor([0.125, 0.5]))
    # Def. 3.6 per sample: |D|/(|m| + ε) = (0.5/ε, 1/(1 + ε)), then 0; mean over the 2 samples
    assert torch.allclose(s.node("norm"), torch.tensor([0.5 / EPS / 2, 1 / (1 + EPS) / 2]))
    assert s.layer == pytest.approx(math.sqrt(1.25) / 2)  # Def. 3.3: ‖D_0‖ = √(0.25 + 1)
    assert s.layer_norm == pytest.approx(math.sqrt(1.25) / (1 + EPS) / 2)  # ‖m_0‖ = 1 (Def. 3.5)


def test_merging_weights_enter_both_sides():
    # α = (¼, ¾): merged relu(¼·4 − ¾·4) = 0, ensemble ¼·4 = 1 → |D| = 1
    h = torch.tensor([[[4.0]], [[-4.0]]])
    assert mloss_from_preacts(h, alpha=[0.25, 0.75], act="relu").node("abs").item() == pytest.approx(1.0)
    # uniform: merged relu(0) = 0, ensemble 2 → 2
    assert mloss_from_preacts(h, act="relu").node("abs").item() == pytest.approx(2.0)


def test_leaky_relu_scales_relu_by_one_minus_slope():
    h = torch.tensor([[[2.0]], [[-2.0]]])
    # merged leaky(0) = 0; ensemble ½(2 − 0.2) = 0.9 = (1 − 0.1)·(ReLU's 1)
    assert mloss_from_preacts(h, act="leaky_relu(0.1)").node("abs").item() == pytest.approx(0.9)
    assert mloss_from_preacts(h, act="relu").node("abs").item() == pytest.approx(1.0)


def test_gated_silu_by_hand():
    # gates (0, 2), ups (1, 1): merged silu(1)·1 = σ(1); ensemble ½(0 + 2σ(2)) = σ(2)
    g = torch.tensor([[[0.0]], [[2.0]]])
    u = torch.ones_like(g)
    s = mloss_from_preacts(g, act="silu", up=u)
    assert s.node("abs").item() == pytest.approx(abs(sig(1) - sig(2)), rel=1e-6)
    # equal gates: σ(g)·u is linear in u → no discrepancy
    s0 = mloss_from_preacts(torch.full((2, 1, 1), 0.7), act="silu", up=torch.tensor([[[1.0]], [[3.0]]]))
    assert s0.node("abs").item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("act", ["relu", "leaky_relu(0.2)", "gelu", "gelu_tanh", "quick_gelu", "silu", "identity"])
def test_zero_for_identical_models_and_for_linear_activation(act):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 7, generator=g)
    w = torch.randn(5, 7, generator=g)
    # D = 0 up to fp32 rounding: ⅓h·3 ≠ h, and torch's vectorised σ may differ by an ulp between the
    # [B, d] merged and the [q, B, d] ensemble layouts (seen: 3e-8 for gelu_tanh with q = 2)
    for q in (2, 3):
        same = mloss_reference(x, torch.stack([w] * q), act=act)
        assert same.node("abs").max() < 1e-6 and same.layer < 1e-5
    single = mloss_reference(x, w[None], act=act)  # q = 1: merging = ensembling
    assert single.layer == 0
    different = mloss_reference(x, torch.randn(3, 5, 7, generator=g), act=act)
    if act == "identity":
        assert different.node("abs").max() < 1e-6  # σ linear: σ(Σαh) = Σασ(h)
    else:
        assert different.layer > 1e-3


def test_remark2_layer_squared_is_sum_of_node_squares():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 9, 11, generator=g)
    d, _ = discrepancy(h, act="gelu")
    for b in range(9):  # per sample: ‖D_b‖² = Σ_j D_bj²
        assert torch.allclose(d[b].norm() ** 2, (d[b] ** 2).sum())
    s = mloss_from_preacts(h, act="gelu")
    # over the batch: Σ_j node_sq_j = mean_b ‖D_b‖²  (≥ layer², Jensen)
    assert float(s.node("sq").sum()) == pytest.approx(float((d.norm(dim=1) ** 2).mean()), rel=1e-5)
    assert s.layer == pytest.approx(float(d.norm(dim=1).mean()), rel=1e-5)
    assert s.layer**2 <= float(s.node("sq").sum()) * (1 + 1e-6)


def test_batches_add_up_and_chunked_equals_eager():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 12, generator=g)
    w = torch.randn(3, 17, 12, generator=g)
    b = torch.randn(3, 17, generator=g)
    whole = mloss_reference(x, w, b, act="gelu_tanh")
    parts = mloss_reference(x[:20], w, b, act="gelu_tanh") + mloss_reference(x[20:], w, b, act="gelu_tanh")
    chunked = mloss_chunked(x, w, b, act="gelu_tanh", chunk_bytes=3 * 17 * 4 * 7)  # 7 rows per chunk
    for s in (parts, chunked):
        assert s.samples == 50
        for st in ("abs", "sq", "norm"):
            torch.testing.assert_close(s.node(st), whole.node(st), rtol=1e-5, atol=1e-7)
        assert s.layer == pytest.approx(whole.layer, rel=1e-6)
        assert s.layer_norm == pytest.approx(whole.layer_norm, rel=1e-6)


def test_preactivations_and_bias():
    x = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 1.0], [1.0, -1.0]]])
    b = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    assert preactivations(x, w, b).tolist() == [[[1.5, 2.0]], [[4.0, -2.0]]]


def test_half_inputs_computed_in_fp32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, generator=g).bfloat16()
    w = torch.randn(2, 5, 6, generator=g).bfloat16()
    s = mloss_reference(x, w, act="silu")
    ref = mloss_reference(x.float(), w.float(), act="silu")
    assert s.node("sq").dtype == torch.float32
    torch.testing.assert_close(s.node("sq"), ref.node("sq"))


def test_activation_parsing_and_errors():
    assert activation("leaky_relu(0.2)").slope == 0.2
    assert activation("gated_silu").gated and activation("gated_silu").name == "silu"
    assert activation("swish").name == "silu" and activation("gelu_pytorch_tanh").name == "gelu_tanh"
    with pytest.raises(ConfigError, match="unknown"):
        activation("tanhh")
    with pytest.raises(ConfigError, match="only leaky_relu"):
        activation("relu(0.3)")


def test_validation_errors():
    x = torch.randn(4, 3)
    w = torch.randn(2, 5, 3)
    with pytest.raises(ConfigError, match=r"\[q, d_out, 3\]"):
        compute_mloss(x, torch.randn(2, 5, 4))
    with pytest.raises(ConfigError, match="merging weights"):
        compute_mloss(x, w, alpha=[1.0])
    with pytest.raises(ConfigError, match="gated"):
        compute_mloss(x, w, activation="gated_silu")
    with pytest.raises(ConfigError, match="bias"):
        compute_mloss(x, w, torch.randn(2, 4))
    with pytest.raises(ConfigError, match="backend"):
        compute_mloss(x, w, backend="cuda")
    with pytest.raises(ConfigError, match="statistic"):
        compute_mloss(x, w).node("max")
