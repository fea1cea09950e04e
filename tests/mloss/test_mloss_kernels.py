"""Fused M-Loss kernels (kernels/mloss.py) against the torch reference: under TRITON_INTERPRET=1 on CPU
(small shapes: the interpreter runs programs one by one in Python), and on a GPU when there is one."""

import pytest
import torch

from fastmerge.mloss import compute_mloss, mloss_reference, preactivations, reduce_preacts

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, else interpreted
B, D_IN, D_OUT, Q = 37, 24, 40, 3  # odd sizes: partial tiles in every dimension
ACTS = ["relu", "leaky_relu(0.2)", "gelu", "gelu_tanh", "quick_gelu", "silu", "identity"]


def inputs(dtype=torch.float32, seed=0, bias=True, gated=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D_IN, generator=g)
    base = torch.randn(D_OUT, D_IN, generator=g) * 0.3
    w = base + 0.1 * torch.randn(Q, D_OUT, D_IN, generator=g)  # fine-tunes of one base: realistic D
    b = 0.1 * torch.randn(Q, D_OUT, generator=g) if bias else None
    up = (base + 0.1 * torch.randn(Q, D_OUT, D_IN, generator=g)) if gated else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEV)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(up)


def assert_stats_close(got, want):
    for st in ("abs", "sq"):
        torch.testing.assert_close(got.node(st), want.node(st), rtol=1e-4, atol=1e-7)
    # |D|/(|m| + ε): where m ≈ 0 the ratio is |D|/1e-4, so an fp32 rounding of D shows 1e4× larger
    torch.testing.assert_close(got.node("norm"), want.node("norm"), rtol=1e-3, atol=1e-5)
    assert got.layer == pytest.approx(want.layer, rel=1e-5)
    assert got.layer_norm == pytest.approx(want.layer_norm, rel=1e-4)
    assert got.samples == want.samples


@pytest.mark.parametrize("act", ACTS)
def test_fused_matches_reference_fp32(act):
    x, w, b, _ = inputs()
    want = mloss_reference(x, w, b, act=act)
    got = compute_mloss(x, w, b, activation=act, backend="triton")
    assert_stats_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "gated_silu"])
def test_fused_half_inputs(dtype, act):
    gated = act.startswith("gated")
    x, w, b, up = inputs(dtype, seed=1, bias=not gated, gated=gated)
    want = mloss_reference(x, w, b, act=act, up_weight=up)  # the reference upcasts the same rounded values
    got = compute_mloss(x, w, b, activation=act, up_weight=up, backend="triton")
    assert_stats_close(got, want)


def test_fused_gated_with_biases_and_weights():
    x, w, b, up = inputs(seed=2, gated=True)
    ub = (0.1 * torch.randn(Q, D_OUT)).to(DEV)
    alpha = [0.5, 0.3, 0.2]
    want = mloss_reference(x, w, b, alpha=alpha, act="gated_silu", up_weight=up, up_bias=ub)
    got = compute_mloss(x, w, b, alpha=alpha, activation="gated_silu", up_weight=up, up_bias=ub, backend="triton")
    assert_stats_close(got, want)


def test_fused_no_bias_and_strided_input():
    x, w, _, _ = inputs(seed=3, bias=False)
    xt = x.T.contiguous().T  # column-major view: strides go to the kernel as they are
    want = mloss_reference(x, w, act="quick_gelu")
    assert_stats_close(compute_mloss(xt, w, activation="quick_gelu", backend="triton"), want)


@pytest.mark.parametrize("act", ACTS)
def test_reduce_only_matches_reference(act):
    x, w, b, _ = inputs(seed=4)
    h = preactivations(x, w, b)
    want = mloss_reference(x, w, b, act=act)
    assert_stats_close(reduce_preacts(h, activation=act, backend="triton"), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduce_only_half_and_gated(dtype):
    x, w, _, up = inputs(seed=5, bias=False, gated=True)
    h = preactivations(x, w).to(dtype)
    u = preactivations(x, up).to(dtype)
    from fastmerge.mloss import mloss_from_preacts

    want = mloss_from_preacts(h.float(), act="silu", up=u.float())
    assert_stats_close(reduce_preacts(h, activation="silu", up=u, backend="triton"), want)


def test_identical_models_give_zero():
    x, w, b, _ = inputs(seed=6)
    same = torch.stack([w[0]] * Q)
    got = compute_mloss(x, same, torch.stack([b[0]] * Q), activation="gelu", backend="triton")
    assert got.node("abs").abs().max() < 1e-6 and got.layer < 1e-5


def test_empty_batch():
    _, w, b, _ = inputs()
    got = compute_mloss(torch.empty(0, D_IN, device=DEV), w, b, activation="relu", backend="triton")
    assert got.samples == 0 and got.node("abs").abs().max() == 0


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA by tests/conftest.py): the issue's shape, against the eager reference


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_issue_shape_correct_and_small_memory(dtype):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    Bg, din, dout, q = 128 * 197, 768, 3072, 8
    x = torch.randn(Bg, din, device=dev, generator=g).to(dtype)
    w = (0.02 * torch.randn(q, dout, din, device=dev, generator=g)).to(dtype)
    b = (0.01 * torch.randn(q, dout, device=dev, generator=g)).to(dtype)
    want = mloss_reference(x, w, b, act="gelu_tanh")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    got = compute_mloss(x, w, b, activation="gelu_tanh", backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - m0
    # outputs 3·d_out + 2·B fp32 (+ α, + the allocator's 2 MB rounding): far below q·B·d_out·4 = 2.5 GB
    assert extra < 8 * 2**20, extra
    for st in ("abs", "sq"):
        torch.testing.assert_close(got.node(st), want.node(st), rtol=2e-3 if dtype != torch.float32 else 1e-4, atol=1e-6)
    assert got.layer == pytest.approx(want.layer, rel=2e-3)
