"""linear: closed-form cases of the reference, then every backend against it."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.linear import LinearParams
from helpers.tolerance import assert_bitwise_equal

ref = get_method("linear").reference


def test_one_hot_weights_return_that_model():
    xs = [torch.randn(33), torch.randn(33), torch.randn(33)]
    assert torch.equal(ref(xs, None, LinearParams((0.0, 1.0, 0.0))), xs[1])


def test_weighted_average_against_float64():
    xs = [torch.randn(1000) for _ in range(3)]
    w = (0.2, 0.5, 0.7)
    got = ref(xs, None, LinearParams(w))
    want = sum(wi * x.double() for wi, x in zip(w, xs)) / sum(w)
    assert torch.allclose(got.double(), want, rtol=0, atol=4 * 2**-23 * float(want.abs().max()))
    unnorm = ref(xs, None, LinearParams(w, normalize=False))
    assert torch.allclose(unnorm.double(), want * sum(w), atol=1e-5)


def test_identical_models_are_a_fixed_point():
    x = torch.randn(257).bfloat16()
    out = ref([x, x, x, x], None, LinearParams((0.25, 0.25, 0.25, 0.25))).bfloat16()
    assert torch.equal(out, x)


def test_zero_weight_sum_rejected():
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_tensors("linear", [torch.randn(3), torch.randn(3)], weight=[1.0, -1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 4099])
def test_backend_matches_reference(backend, dtype, n):
    xs = [torch.randn(n).to(dtype) for _ in range(3)]
    w = [0.33, 0.5, -0.1]
    got = merge_tensors("linear", xs, weight=w, backend=backend)
    want = ref(xs, None, LinearParams(tuple(w))).to(dtype)
    assert_bitwise_equal(got, want, f"linear {backend} {dtype} n={n}")
