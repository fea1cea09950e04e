"""model_stock: t from the mean pairwise cosine (t = 1 / 0 / by hand), filter_wise rows, singular case, backends."""

import math

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.model_stock import ModelStockParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("model_stock")
ref = METHOD.reference
#: default mode vs the fp64 formula, × max|result|: fp32-level errors (16-bit inputs: fp32 Gram blocks)
BOUND = {torch.float32: 2 * 2**-24, torch.bfloat16: 8 * 2**-24}
P = ModelStockParams()


def test_identical_task_vectors_give_t1_the_average():
    # cos θ = 1: t = N/(1 + N − 1) = 1, out = mean of the fine-tunes (= the fine-tune here)
    base, d = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -0.25, 2.0])
    out = ref([base + d, base + d, base + d], base, P)
    assert torch.allclose(out, base + d, rtol=0, atol=1e-6)


def test_orthogonal_task_vectors_give_t0_the_base():
    base = torch.tensor([1.0, 2.0, 3.0])
    out = ref([base + torch.tensor([1.0, 0, 0]), base + torch.tensor([0, 2.0, 0])], base, P)
    assert torch.equal(out, base)


def test_two_models_by_hand():
    # δ1 = (1, 0), δ2 = (1, 1): cos θ = 1/√2, t = 2c/(1 + c); mean of the fine-tunes = base + (1, 0.5)
    base = torch.tensor([2.0, -1.0])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = ref([base + torch.tensor([1.0, 0.0]), base + torch.tensor([1.0, 1.0])], base, P)
    want = t * (base + torch.tensor([1.0, 0.5])) + (1 - t) * base
    assert torch.allclose(out, want, rtol=0, atol=1e-6)


def test_three_models_by_hand():
    # δ = e1, e2, e1 + e2: pair cosines 0, 1/√2, 1/√2 → mean c = √2/3; t = 3c/(1 + 2c)
    base = torch.zeros(2)
    ds = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    out = ref(ds, base, P)
    assert torch.allclose(out, t * torch.tensor([2 / 3, 2 / 3]), rtol=0, atol=1e-6)


def test_singular_denominator_keeps_the_base():
    # N = 2, antipodal task vectors: cos θ = −1, 1 + (N−1)·cos θ = 0 → t = 0
    base, d = torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])
    assert torch.equal(ref([base + d, base - d], base, P), base)


def test_filter_wise_one_ratio_per_row():
    # row 0: identical task vectors (t = 1); row 1: orthogonal ones (t = 0)
    base = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    x1 = base + torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    x2 = base + torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    out = ref([x1, x2], base, ModelStockParams(filter_wise=True))
    assert torch.allclose(out, torch.tensor([[2.0, 3.0], [5.0, 5.0]]), rtol=0, atol=1e-6)
    # flattened: one cosine for the whole tensor, (1 + 4)/(√6·√6) = 5/6
    c = 5 / 6
    t = 2 * c / (1 + c)
    flat = ref([x1, x2], base, P)
    assert torch.allclose(flat, base + t * (x1 + x2 - 2 * base) / 2, rtol=0, atol=1e-6)


def test_filter_wise_on_a_vector_is_the_whole_tensor():
    base = torch.randn(9)
    xs = [base + torch.randn(9) for _ in range(3)]
    assert torch.allclose(ref(xs, base, ModelStockParams(filter_wise=True)), ref(xs, base, P), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_default_mode_is_the_formula_in_float64(filter_wise, dtype):
    b = torch.randn(40, 24)
    xs = [(b + 0.1 * torch.randn(40, 24) + 0.05).to(dtype) for _ in range(3)]
    b = b.to(dtype)
    p = ModelStockParams(filter_wise)
    want = ref([x.double() for x in xs], b.double(), p, compat=True)  # mergekit's sequence, in fp64
    got = ref(xs, b, p)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= BOUND[dtype] * float(want.abs().max())


def test_validation():
    b, x = torch.randn(4), torch.randn(4)
    with pytest.raises(ConfigError, match="needs base"):
        merge_tensors("model_stock", [x, x])
    with pytest.raises(ConfigError, match=r"tensor\(s\) besides the base, got 1"):
        merge_tensors("model_stock", [x], b)
    with pytest.raises(ConfigError, match="at least two other models"):  # the reference guards itself too
        ref([x], b, P)
    with pytest.raises(ConfigError, match="must be a boolean"):
        merge_tensors("model_stock", [x, x], b, filter_wise="rows")


def _runs(backend: str) -> None:
    skip_unless_runs(backend, METHOD, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65)])
@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, n_models, filter_wise, compat):
    _runs(backend)
    b = torch.randn(shape).to(dtype)
    xs = [(b.float() + 0.5 * torch.randn(shape) + 0.3).to(dtype) for _ in range(n_models)]
    got = merge_tensors("model_stock", xs, b, backend=backend, filter_wise=filter_wise, mergekit_compat=compat)
    want = ref(xs, b, ModelStockParams(filter_wise), compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"model_stock {backend} {dtype} {shape} n={n_models} fw={filter_wise} compat={compat}")
