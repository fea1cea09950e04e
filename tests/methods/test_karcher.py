"""karcher: midpoints, an iterated circle mean (30°, not the chordal 26.57°), zero norms, validation, backends."""

import math

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.karcher import KarcherParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("karcher")
ref = METHOD.reference
#: default mode vs the fp64 formula, × max|result|: fp32-level errors (16-bit inputs: fp32 Gram blocks)
BOUND = {torch.float32: 2 * 2**-24, torch.bfloat16: 8 * 2**-24}
R2 = 2**-0.5
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def unit(deg: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def test_one_model_is_that_model_exactly():
    x = torch.randn(4, 3)
    assert torch.equal(ref([x], None, KarcherParams()), x)


def test_two_unit_vectors_give_the_normalised_midpoint():
    out = ref([E1, E2], None, KarcherParams())
    assert torch.allclose(out, torch.tensor([R2, R2]), rtol=0, atol=1e-6)


def test_scaled_by_the_mean_norm():
    # equal weights 1/2: direction of the midpoint, scale (3 + 5)/2
    out = ref([3 * E1, 5 * E2], None, KarcherParams())
    assert torch.allclose(out, 4 * torch.tensor([R2, R2]), rtol=0, atol=4e-6)


def test_circle_mean_is_the_mean_angle():
    # on a circle the Karcher mean of angles 0°, 0°, 90° is their mean, 30°; the normalised Euclidean
    # mean (the starting point) is atan(1/2) = 26.565°. One log/exp step lands on 30° exactly.
    xs = [unit(0), unit(0), unit(90)]
    out = ref(xs, None, KarcherParams())
    assert torch.allclose(out, unit(30), rtol=0, atol=1e-6)
    start = ref(xs, None, KarcherParams(max_iter=0))
    assert torch.allclose(start, unit(math.degrees(math.atan(0.5))), rtol=0, atol=1e-6)


def test_weights_are_equal_whatever_the_order():
    xs = [unit(10), unit(80), unit(35), unit(-20)]
    a = ref(xs, None, KarcherParams(max_iter=50, tol=1e-9))
    b = ref(xs[::-1], None, KarcherParams(max_iter=50, tol=1e-9))
    assert torch.allclose(a, unit((10 + 80 + 35 - 20) / 4), rtol=0, atol=1e-5)
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_zero_norm_inputs():
    # a zero model leaves the mean direction alone but still counts in the scale Σ α_i‖x_i‖ (mergekit)
    out = ref([torch.zeros(2), 2 * E1], None, KarcherParams())
    assert torch.allclose(out, E1, rtol=0, atol=1e-7)
    assert torch.equal(ref([torch.zeros(3), torch.zeros(3)], None, KarcherParams()), torch.zeros(3))


def test_base_is_not_read():
    # base policy "ignored": a base tensor handed to the reference plays no part
    xs = [torch.randn(10), torch.randn(10)]
    for compat in (False, True):
        assert torch.equal(ref(xs, torch.randn(10), KarcherParams(), compat), ref(xs, None, KarcherParams(), compat))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_default_mode_is_the_formula_in_float64(n_models, dtype):
    # the coordinate iteration (fp64, from the Gram matrix) vs mergekit's full-size iteration run in fp64
    c = torch.randn(500)
    xs = [(c + 0.3 * torch.randn(500)).to(dtype) for _ in range(n_models)]
    p = KarcherParams(max_iter=20, tol=1e-9)
    want = ref([x.double() for x in xs], None, p, compat=True)
    got = ref(xs, None, p)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= BOUND[dtype] * float(want.abs().max())


def test_validation():
    x = torch.randn(4)
    with pytest.raises(ConfigError, match="max_iter must be >= 0"):
        merge_tensors("karcher", [x, x], max_iter=-1)
    with pytest.raises(ConfigError, match="tol must be >= 0"):
        merge_tensors("karcher", [x, x], tol=-1e-5)
    with pytest.raises(ConfigError, match="must be a number"):
        merge_tensors("karcher", [x, x], tol="small")
    with pytest.raises(ConfigError, match="no parameter 'weight'"):
        merge_tensors("karcher", [x, x], weight=[1.0, 2.0])  # mergekit's karcher takes no weights


def _runs(backend: str) -> None:
    skip_unless_runs(backend, METHOD, KarcherParams())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65)])
@pytest.mark.parametrize("n_models", [1, 2, 3])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, n_models, compat):
    _runs(backend)
    xs = [torch.randn(shape).to(dtype) for _ in range(n_models)]
    got = merge_tensors("karcher", xs, backend=backend, max_iter=7, mergekit_compat=compat)
    want = ref(xs, None, KarcherParams(max_iter=7), compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"karcher {backend} {dtype} {shape} n={n_models} compat={compat}")
